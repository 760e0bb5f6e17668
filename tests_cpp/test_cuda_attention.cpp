// The CUDA backend against the CPU reference; skipped without a device.
#include <gtest/gtest.h>

#include "kvpack/attention.h"
#include "kvpack/backend.h"
#include "reference.h"

namespace kvpack {
namespace {

TEST(CudaAttention, MatchesCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  Execution gpu_exec;
  gpu_exec.stage_to_cuda = true;
  testing::Cache c(4, 3000, 128, 11);
  const auto q = testing::random_vector(16 * 128, 12);
  std::vector<float> cpu(q.size()), gpu(q.size()), lse_cpu(16), lse_gpu(16);
  decode_attention(q.data(), 16, c.k, c.v, nullptr, nullptr, {},
                   {cpu.data(), lse_cpu.data(), nullptr});
  decode_attention(q.data(), 16, c.k, c.v, nullptr, nullptr, {},
                   {gpu.data(), lse_gpu.data(), nullptr}, gpu_exec);
  for (std::size_t i = 0; i < cpu.size(); ++i) EXPECT_NEAR(cpu[i], gpu[i], 2e-5);
  for (int h = 0; h < 16; ++h) EXPECT_NEAR(lse_cpu[h], lse_gpu[h], 1e-4);

  const auto queries = testing::random_vector(16 * 32 * 128, 13);
  std::vector<float> acc_cpu(4 * 3000), acc_gpu(4 * 3000);
  accumulated_attention(queries.data(), 16, 32, c.k, {}, acc_cpu.data());
  accumulated_attention(queries.data(), 16, 32, c.k, {}, acc_gpu.data(), gpu_exec);
  for (std::size_t i = 0; i < acc_cpu.size(); ++i) EXPECT_NEAR(acc_cpu[i], acc_gpu[i], 1e-5);
}

}  // namespace
}  // namespace kvpack

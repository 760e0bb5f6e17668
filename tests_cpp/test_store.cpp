// Codec blobs, tiers and the tiered store on small inputs (also under AddressSanitizer +
// UBSan); the values against NumPy references, Redis and crash recovery are checked by
// pytest.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>

#include "kvpack/checksum.h"
#include "kvpack/codec.h"
#include "kvpack/policy.h"
#include "kvpack/store.h"
#include "kvpack/tier.h"
#include "reference.h"

namespace kvpack {
namespace {

TEST(ClusterSlot, FollowsTheRedisClusterSpecification) {
  // The specification's CRC16 check value (0x31C3 for "123456789"), and CLUSTER KEYSLOT's.
  EXPECT_EQ(cluster_slot("123456789"), 0x31C3);
  EXPECT_EQ(cluster_slot("foo"), 12182);
  EXPECT_EQ(cluster_slot(""), 0);
  // Hash tags: the first '{' up to the next '}', when not empty.
  EXPECT_EQ(cluster_slot("{user1000}.following"), cluster_slot("user1000"));
  EXPECT_NE(cluster_slot("foo{}{bar}"), cluster_slot("bar"));
  EXPECT_EQ(cluster_slot("foo{{bar}}zap"), cluster_slot("{bar"));
  EXPECT_EQ(cluster_slot("foo{bar}{zap}"), cluster_slot("bar"));
  EXPECT_NE(cluster_slot("{unclosed"), cluster_slot("unclosed"));  // the whole key
}

TEST(Checksum, KnownValues) {
  EXPECT_EQ(xxh64("", 0), 0xEF46DB3751D8E999ull);
  EXPECT_EQ(xxh3("", 0), 0x2D06800538D394C2ull);
  const std::string text = "kvpack blob checksum over more than thirty-two bytes";
  EXPECT_NE(xxh64(text.data(), text.size()), xxh64(text.data(), text.size(), 1));
}

TEST(Codec, EveryCodecRoundTripsAndFlippedBytesAreCaught) {
  testing::Cache c(2, 200, 16, 5);
  const std::vector<LayerView> layers{{c.k, c.v}, {c.k, c.v}};
  for (const char* name : {"none", "kivi-8", "kivi-4", "kivi-2", "streaming_llm-0.5", "snapkv-0.25",
                           "h2o-0.5", "kvmerger-0.5"}) {
    const Codec codec = parse_codec(name);
    EXPECT_EQ(codec.name(), name);
    const BlobPtr blob = encode("key", layers, codec);
    ASSERT_TRUE(verify_blob(*blob)) << name;
    const DecodedKV kv = decode(blob, true);
    ASSERT_EQ(kv.layers.size(), 2u);
    EXPECT_EQ(kv.layers[0].tokens, std::llround(codec.rate * 200)) << name;
    if (codec.lossless()) {
      EXPECT_EQ(std::memcmp(kv.layers[1].keys, c.keys.data(), c.keys.size() * sizeof(float)), 0);
    }
    auto bad = std::make_shared<Buffer>(blob->size());
    std::memcpy(bad->data(), blob->data(), blob->size());
    bad->data()[blob->size() / 2] ^= 4;
    EXPECT_FALSE(verify_blob(*bad)) << name;
  }
  EXPECT_THROW(parse_codec("kivi-3"), std::invalid_argument);
  EXPECT_THROW(parse_codec("h2o-2"), std::invalid_argument);
}

TEST(Placement, CapacitiesHoldAndPriorityDecidesEvictions) {
  std::vector<PlacementItem> items(3);
  for (int i = 0; i < 3; ++i) {
    items[i].priority = i;
    items[i].options = {{0, 8, 1.0}, {0, 4, 0.5}, {1, 8, 0.8}, {1, 4, 0.3}};
  }
  const std::vector<int> choice = place(items, {4, 4});
  std::int64_t used[2] = {0, 0};
  for (int i = 0; i < 3; ++i)
    if (choice[i] >= 0) used[items[i].options[choice[i]].tier] += items[i].options[choice[i]].bytes;
  EXPECT_LE(used[0], 4);
  EXPECT_LE(used[1], 4);
  EXPECT_EQ(choice[0], -1);  // the lowest priority leaves when only 2 x 4 bytes fit
}

TEST(Store, SsdEntriesSurviveReopenAndCorruptionIsDropped) {
  const std::string directory =
      (std::filesystem::temp_directory_path() / ("kvpack-test-" + std::to_string(::getpid())))
          .string();
  testing::Cache c(2, 64, 8, 9);
  const std::vector<LayerView> layers{{c.k, c.v}};
  StoreParams params;
  params.dram_bytes = 0;
  params.ssd_dir = directory;
  params.ssd_bytes = 1 << 20;
  params.policy = StorePolicy::LRU;
  params.bandwidths = {1e10, 1e9};
  {
    TieredStore store(params);
    store.put("a", layers, {});
    store.put("b", layers, {});
    const auto got = store.get("a");
    ASSERT_TRUE(got);
    EXPECT_EQ(got->tier, "ssd");
    EXPECT_EQ(std::memcmp(got->kv.layers[0].values, c.values.data(), c.values.size() * 4), 0);
  }
  {
    TieredStore store(params);
    EXPECT_TRUE(store.contains("a") && store.contains("b"));
    for (const auto& file : std::filesystem::directory_iterator(directory)) {
      std::FILE* f = std::fopen(file.path().c_str(), "r+b");
      ASSERT_NE(f, nullptr);
      std::fseek(f, 200, SEEK_SET);
      std::fputc(0x55, f);
      std::fclose(f);
    }
    EXPECT_FALSE(store.get("a"));
    EXPECT_FALSE(store.contains("a"));
    EXPECT_EQ(store.stats().corrupt, 1);
  }
  std::filesystem::remove_all(directory);
}

TEST(Store, AdaptiveCompressesWhenDramIsShort) {
  testing::Cache c(2, 256, 16, 3);
  const std::vector<LayerView> layers{{c.k, c.v}};
  StoreParams params;
  params.dram_bytes = 40000;  // the uncompressed entry needs 65536 + header
  params.codecs = {parse_codec("none"), parse_codec("kivi-4"), parse_codec("kivi-2")};
  params.bandwidths = {1e10};
  TieredStore store(params);
  store.put("x", layers, {});
  const auto where = store.where("x");
  ASSERT_TRUE(where);
  EXPECT_TRUE(where->second.quantizes());
  const auto got = store.get("x");
  ASSERT_TRUE(got);
  EXPECT_GT(got->quality, 0.5);
  EXPECT_LT(got->quality, 1.0);
  EXPECT_LE(store.stats().tiers[0].used, params.dram_bytes);
}

}  // namespace
}  // namespace kvpack

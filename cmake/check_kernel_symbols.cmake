# Fails when an object of one build of the CPU kernels defines code visible outside it and
# outside its namespace (kvpack::${NAMESPACE}): the linker would pick one build's copy of
# such a function for every caller, and a baseline caller could run AVX-512 code.
# Usage: cmake -DNM=nm -DNAMESPACE=x86_64_v3 -DOBJECTS="a.o;b.o" -P check_kernel_symbols.cmake
foreach(object IN LISTS OBJECTS)
  execute_process(COMMAND ${NM} --defined-only --demangle ${object}
                  OUTPUT_VARIABLE symbols RESULT_VARIABLE failed)
  if(failed)
    message(FATAL_ERROR "${NM} could not read ${object}")
  endif()
  string(REPLACE "\n" ";" lines "${symbols}")
  foreach(line IN LISTS lines)
    # "<address> <type> <name>": T/W/i are global, weak or indirect code.
    if(line MATCHES "^[0-9a-f]+ ([TWi]) (.*)$")
      set(name "${CMAKE_MATCH_2}")
      if(NOT name MATCHES "kvpack::${NAMESPACE}::")
        message(FATAL_ERROR "${object}: '${name}' is shared with the other builds of the CPU "
                            "kernels; give it a private copy (in namespace kvpack::${NAMESPACE})")
      endif()
    endif()
  endforeach()
endforeach()

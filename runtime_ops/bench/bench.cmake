# Kernel microbenchmark (no onnxruntime): build/int_linear_bench [MxKxN ...]
add_executable(int_linear_bench "${CMAKE_CURRENT_LIST_DIR}/int_linear_bench.cc" $<TARGET_OBJECTS:baseq_kernels>)
target_include_directories(int_linear_bench PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}")
target_compile_options(int_linear_bench PRIVATE ${BASEQ_FLAGS})

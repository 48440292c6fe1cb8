# C++ tests of the kernels (no onnxruntime needed): int_linear_test checks every instruction-set
# kernel this CPU runs against the scalar kernel and the definition. Run: ctest --test-dir build
# (cross builds run it through CMAKE_CROSSCOMPILING_EMULATOR, e.g. qemu-aarch64).
enable_testing()
add_executable(int_linear_test "${CMAKE_CURRENT_LIST_DIR}/int_linear_test.cc" $<TARGET_OBJECTS:baseq_kernels>)
target_include_directories(int_linear_test PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}")
target_compile_options(int_linear_test PRIVATE ${BASEQ_FLAGS})
add_test(NAME int_linear_test COMMAND int_linear_test)
add_executable(attention_test "${CMAKE_CURRENT_LIST_DIR}/attention_test.cc" $<TARGET_OBJECTS:baseq_kernels>)
target_include_directories(attention_test PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}")
target_compile_options(attention_test PRIVATE ${BASEQ_FLAGS})
add_test(NAME attention_test COMMAND attention_test)

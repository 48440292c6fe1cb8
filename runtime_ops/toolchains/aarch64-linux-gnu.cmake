# Cross-compiling libbaseq_ops.so for 64-bit ARM Linux with Debian's cross compiler
# (apt install g++-aarch64-linux-gnu):
#   cmake -S runtime_ops -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=runtime_ops/toolchains/aarch64-linux-gnu.cmake \
#         -DORT_INCLUDE_DIR=/path/to/onnxruntime/include
# Test binaries run under qemu-user: qemu-aarch64 -L /usr/aarch64-linux-gnu build-aarch64/int_linear_test
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CROSS_PREFIX aarch64-linux-gnu- CACHE STRING "prefix of the cross tools")
set(CMAKE_C_COMPILER ${CROSS_PREFIX}gcc)
set(CMAKE_CXX_COMPILER ${CROSS_PREFIX}g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# Lets a test runner (ctest) execute the cross-built test binaries through qemu-user.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/aarch64-linux-gnu)

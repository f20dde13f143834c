// Runs one kernel of kernels/matvec.cu on the CPU (cuda_emu.h): the driver behind strata-kernels'
// tests/emu.rs.
//
//   matvec_emu KERNEL BLOCKS THREADS SMEM IN OUT
//
// IN holds the MatvecParams fields (u32 rows, u32 cols, u64 row_bytes, u64 total_bytes, u32
// tokens), u32 x_len, u32 y_len, then the weight's total_bytes bytes, x_len f32 and y_len f32
// (y's values before the launch); OUT receives y after it. Little-endian, no padding. The grid is
// BLOCKS blocks of THREADS threads with SMEM bytes of dynamic shared memory, filled with a 0xA5
// pattern before each block so that a read of unwritten shared memory shows.
// The standard headers first: cuda_emu.h defines CUDA's keywords as macros, which must not
// reach them.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "cuda_emu.h"

#include "matvec.cu"

using Kernel = void (*)(MatvecParams, const unsigned char*, const float*, float*);

template <class T>
static T take(const std::vector<unsigned char>& in, size_t& at) {
    T v;
    if (at + sizeof(T) > in.size()) {
        std::fprintf(stderr, "matvec_emu: input ends early\n");
        std::exit(2);
    }
    std::memcpy(&v, in.data() + at, sizeof(T));
    at += sizeof(T);
    return v;
}

int main(int argc, char** argv) {
    if (argc != 7) {
        std::fprintf(stderr, "usage: matvec_emu KERNEL BLOCKS THREADS SMEM IN OUT\n");
        return 2;
    }
    const auto kernel = reinterpret_cast<Kernel>(dlsym(RTLD_DEFAULT, argv[1]));
    if (!kernel) {
        std::fprintf(stderr, "matvec_emu: no kernel %s\n", argv[1]);
        return 2;
    }
    const unsigned int blocks = (unsigned int)std::atoi(argv[2]), threads = (unsigned int)std::atoi(argv[3]);
    const unsigned int smem_bytes = (unsigned int)std::atoi(argv[4]);
    if (threads == 0 || threads % 32 || smem_bytes > sizeof(emu_smem)) {
        std::fprintf(stderr, "matvec_emu: bad launch (%u threads, %u bytes of shared memory)\n", threads, smem_bytes);
        return 2;
    }
    std::vector<unsigned char> in;
    {
        FILE* f = std::fopen(argv[5], "rb");
        if (!f) return std::perror(argv[5]), 2;
        unsigned char buf[1 << 16];
        size_t got;
        while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) in.insert(in.end(), buf, buf + got);
        std::fclose(f);
    }
    size_t at = 0;
    MatvecParams p{};
    p.rows = take<unsigned int>(in, at);
    p.cols = take<unsigned int>(in, at);
    p.row_bytes = take<unsigned long long>(in, at);
    p.total_bytes = take<unsigned long long>(in, at);
    p.tokens = take<unsigned int>(in, at);
    const unsigned int x_len = take<unsigned int>(in, at), y_len = take<unsigned int>(in, at);
    if (at + p.total_bytes + 4ull * (x_len + y_len) != in.size()) {
        std::fprintf(stderr, "matvec_emu: input of %zu bytes, expected %llu\n", in.size(),
                     (unsigned long long)(at + p.total_bytes + 4ull * (x_len + y_len)));
        return 2;
    }
    // Each buffer on its own allocation, exactly sized, so that a read past its end can show
    // (under a sanitizer) rather than land in the next one.
    std::unique_ptr<unsigned char[]> w(new unsigned char[p.total_bytes]);
    std::memcpy(w.get(), in.data() + at, p.total_bytes);
    at += p.total_bytes;
    std::vector<float> x(x_len), y(y_len);
    std::memcpy(x.data(), in.data() + at, 4ull * x_len);
    at += 4ull * x_len;
    std::memcpy(y.data(), in.data() + at, 4ull * y_len);

    emu_launch(dim3{blocks, 1, 1}, threads, smem_bytes, [&] { kernel(p, w.get(), x.data(), y.data()); });
    FILE* f = std::fopen(argv[6], "wb");
    if (!f) return std::perror(argv[6]), 2;
    std::fwrite(y.data(), 4, y.size(), f);
    std::fclose(f);
    return 0;
}

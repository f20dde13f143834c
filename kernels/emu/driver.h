// The command-line driver of the CPU emulation for any kernel file (used by emu_<file>.cpp, which
// includes this, then the kernel file, then lists its kernels with EMU_KERNELS):
//
//   emu_<file> KERNEL GX GY GZ BX BY BZ SMEM PARAMS BUF...
//
// runs KERNEL on a grid of GX x GY x GZ blocks of BX threads (BY = BZ = 1) with SMEM bytes of
// dynamic shared memory (filled with 0xA5 before each block). PARAMS is a file holding the
// kernel's parameter struct as the C compiler lays it out; each BUF is a file holding one of its
// pointer arguments, in order, loaded into its own allocation and written back after the launch;
// `=I` instead of a file passes buffer I again (an in-place call), `null` a null pointer, and a
// `:N` suffix on a file or `=I` passes the pointer N bytes into the buffer (a view, unaligned if
// N is). `+FILE` loads (and writes back) a buffer the kernel reaches only through a table, not as
// an argument; `*I,J,..` passes a table of 64-bit addresses of buffers I, J, .. (a device table
// of block pointers, as the KV cache keeps). Buffer indices count files only, `+` ones included.
#pragma once

// The standard headers first: cuda_emu.h defines CUDA's keywords as macros, which must not reach
// them.
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cuda_emu.h"

// A kernel the driver can run: its name, the size of its parameter struct, its count of pointer
// arguments, and a thunk that calls it from the raw bytes and pointers.
struct EmuEntry {
    const char* name;
    size_t params;
    size_t buffers;
    std::function<void(const unsigned char*, void* const*)> call;
};

template <class P, class... A, size_t... I>
void emu_call(void (*kernel)(P, A...), const unsigned char* params, void* const* bufs, std::index_sequence<I...>) {
    P p;
    std::memcpy(&p, params, sizeof(P));
    kernel(p, static_cast<A>(bufs[I])...);
}

template <class P, class... A>
EmuEntry emu_entry(const char* name, void (*kernel)(P, A...)) {
    return EmuEntry{name, sizeof(P), sizeof...(A), [kernel](const unsigned char* params, void* const* bufs) {
                        emu_call(kernel, params, bufs, std::index_sequence_for<A...>{});
                    }};
}

#define EMU_KERNEL(k) emu_entry(#k, k)
#define EMU_KERNELS(...)                                         \
    const std::vector<EmuEntry>& emu_entries() {                 \
        static const std::vector<EmuEntry> entries{__VA_ARGS__}; \
        return entries;                                          \
    }

const std::vector<EmuEntry>& emu_entries();

static std::vector<unsigned char> emu_read(const char* path) {
    std::vector<unsigned char> data;
    FILE* f = std::fopen(path, "rb");
    if (!f) std::perror(path), std::exit(2);
    unsigned char buf[1 << 16];
    size_t got;
    while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + got);
    std::fclose(f);
    return data;
}

int main(int argc, char** argv) {
    if (argc < 11) {
        std::fprintf(stderr, "usage: %s KERNEL GX GY GZ BX BY BZ SMEM PARAMS BUF...\n", argv[0]);
        return 2;
    }
    const EmuEntry* entry = nullptr;
    for (const EmuEntry& e : emu_entries())
        if (std::string(e.name) == argv[1]) entry = &e;
    if (!entry) return std::fprintf(stderr, "%s: no kernel %s\n", argv[0], argv[1]), 2;
    unsigned int dims[6];
    for (int i = 0; i < 6; ++i) dims[i] = (unsigned int)std::strtoul(argv[2 + i], nullptr, 10);
    const unsigned int threads = dims[3], smem_bytes = (unsigned int)std::strtoul(argv[8], nullptr, 10);
    if (threads == 0 || threads % 32 || dims[4] != 1 || dims[5] != 1 || smem_bytes > sizeof(emu_smem)) {
        std::fprintf(stderr, "%s: bad launch (%u x %u x %u threads, %u bytes of shared memory)\n", argv[0], dims[3],
                     dims[4], dims[5], smem_bytes);
        return 2;
    }
    const std::vector<unsigned char> params = emu_read(argv[9]);
    int passed = 0;
    for (int i = 10; i < argc; ++i) passed += argv[i][0] != '+';
    if (params.size() != entry->params || (size_t)passed != entry->buffers) {
        std::fprintf(stderr, "%s: %s takes %zu parameter bytes and %zu buffers, got %zu and %d\n", argv[0], argv[1],
                     entry->params, entry->buffers, params.size(), passed);
        return 2;
    }
    // Each buffer in an allocation of its own, exactly sized (a sanitizer can see overruns).
    std::vector<std::vector<unsigned char>> data;
    std::vector<std::unique_ptr<unsigned char[]>> owned;
    std::vector<void*> bufs;
    std::vector<std::string> files;
    // Tables of buffer addresses: the argument they fill, and the buffers they list.
    std::vector<std::pair<size_t, std::vector<size_t>>> tables;
    std::vector<std::unique_ptr<unsigned long long[]>> table_mem;
    for (int i = 10; i < argc; ++i) {
        std::string arg = argv[i];
        if (arg == "null") {
            bufs.push_back(nullptr);
            continue;
        }
        if (arg[0] == '*') {
            std::vector<size_t> list;
            for (const char* c = arg.c_str() + 1; *c;) {
                char* end;
                list.push_back(std::strtoul(c, &end, 10));
                c = *end == ',' ? end + 1 : end;
            }
            tables.emplace_back(bufs.size(), std::move(list));
            bufs.push_back(nullptr);
            continue;
        }
        const bool extra = arg[0] == '+';
        if (extra) {
            arg.erase(0, 1);
            files.push_back(arg);
            data.push_back(emu_read(arg.c_str()));
            owned.emplace_back(new unsigned char[std::max<size_t>(data.back().size(), 1)]);
            std::memcpy(owned.back().get(), data.back().data(), data.back().size());
            continue;
        }
        size_t offset = 0;
        if (const size_t colon = arg.rfind(':'); colon != std::string::npos) {
            offset = std::strtoul(arg.c_str() + colon + 1, nullptr, 10);
            arg.resize(colon);
        }
        if (arg[0] == '=') {
            const size_t j = std::strtoul(arg.c_str() + 1, nullptr, 10);
            if (j >= owned.size()) return std::fprintf(stderr, "%s: no buffer %zu to alias\n", argv[0], j), 2;
            bufs.push_back(owned[j].get() + offset);
            continue;
        }
        files.push_back(arg);
        data.push_back(emu_read(arg.c_str()));
        owned.emplace_back(new unsigned char[std::max<size_t>(data.back().size(), 1)]);
        std::memcpy(owned.back().get(), data.back().data(), data.back().size());
        bufs.push_back(owned.back().get() + offset);
    }
    for (auto& [at, list] : tables) {
        table_mem.emplace_back(new unsigned long long[std::max<size_t>(list.size(), 1)]);
        for (size_t j = 0; j < list.size(); ++j) {
            if (list[j] >= owned.size()) return std::fprintf(stderr, "%s: no buffer %zu for a table\n", argv[0], list[j]), 2;
            table_mem.back()[j] = (unsigned long long)(size_t)owned[list[j]].get();
        }
        bufs[at] = table_mem.back().get();
    }
    emu_launch(dim3{dims[0], dims[1], dims[2]}, threads, smem_bytes, [&] { entry->call(params.data(), bufs.data()); });
    for (size_t i = 0; i < files.size(); ++i) {
        FILE* f = std::fopen(files[i].c_str(), "wb");
        if (!f) return std::perror(files[i].c_str()), 2;
        std::fwrite(owned[i].get(), 1, data[i].size(), f);
        std::fclose(f);
    }
    return 0;
}

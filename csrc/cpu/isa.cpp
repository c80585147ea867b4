// CPU and OS feature detection for the kernel paths (cpuid + xgetbv). A zmm kernel
// needs both the CPU bits and the OS saving the opmask/zmm state (XCR0 bits 5-7):
// a hypervisor or kernel can hide the latter while cpuid still lists AVX-512.
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "search.h"

namespace vqkern_cpu {
namespace {

struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  if (!__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d)) r = Regs{};
  return r;
}

uint64_t xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

struct Features {
  std::string missing[kIsaCount];
  Features() {
    const Regs l1 = cpuid(1, 0), l7 = cpuid(7, 0), l71 = cpuid(7, 1);
    const unsigned max_leaf = cpuid(0, 0).a;
    const bool osxsave = l1.c & (1u << 27);
    const uint64_t x = osxsave ? xcr0() : 0;
    std::string avx2;
    if (!(l1.c & (1u << 28))) avx2 += "AVX (cpuid leaf 1 ECX bit 28); ";
    if (!(l1.c & (1u << 12))) avx2 += "FMA (cpuid leaf 1 ECX bit 12); ";
    if (max_leaf < 7 || !(l7.b & (1u << 5))) avx2 += "AVX2 (cpuid leaf 7 EBX bit 5); ";
    if ((x & 0x6) != 0x6) avx2 += "OS support for ymm state (XCR0 bits 1-2); ";
    std::string avx512 = avx2;
    const struct {
      unsigned bit;
      const char* name;
    } need512[] = {{16, "AVX512F (cpuid leaf 7 EBX bit 16)"},
                   {17, "AVX512DQ (cpuid leaf 7 EBX bit 17)"},
                   {30, "AVX512BW (cpuid leaf 7 EBX bit 30)"},
                   {31, "AVX512VL (cpuid leaf 7 EBX bit 31)"}};
    for (const auto& f : need512)
      if (max_leaf < 7 || !(l7.b & (1u << f.bit))) avx512 += std::string(f.name) + "; ";
    if ((x & 0xE6) != 0xE6) avx512 += "OS support for opmask/zmm state (XCR0 bits 5-7); ";
    std::string bf16 = avx512;
    if (max_leaf < 7 || !(l71.a & (1u << 5))) bf16 += "AVX512-BF16 vdpbf16ps (cpuid leaf 7.1 EAX bit 5); ";
    std::string amx = bf16;
    if (max_leaf < 7 || !(l7.d & (1u << 24))) amx += "AMX-TILE (cpuid leaf 7 EDX bit 24); ";
    if (max_leaf < 7 || !(l7.d & (1u << 22))) amx += "AMX-BF16 (cpuid leaf 7 EDX bit 22); ";
    if ((x & 0x60000) != 0x60000) amx += "OS support for tile state (XCR0 bits 17-18); ";
    // Linux hands out the (8 KB) tile data state only to processes that ask for it.
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (amx == bf16 && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
      amx += "the OS's permission for AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM refused); ";
    std::string* all[kIsaCount] = {&avx2, &avx512, &bf16, &amx};
    for (int i = 0; i < kIsaCount; ++i) {
      std::string& s = *all[i];
      if (s.size() >= 2) s.resize(s.size() - 2);
      missing[i] = s;
    }
  }
};

const Features& features() {
  static const Features f;
  return f;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAmx: return "amx";
  }
  return "?";
}

std::string isa_missing(Isa isa) {
  const int i = static_cast<int>(isa);
  if (i < 0 || i >= kIsaCount) throw std::invalid_argument("unknown ISA");
  return features().missing[i];
}

Isa best_isa() {
  for (int i = kIsaCount - 1; i >= 0; --i)
    if (features().missing[i].empty()) return static_cast<Isa>(i);
  throw std::runtime_error("vqkern._cpu needs a CPU with AVX2 and FMA: missing " + features().missing[0]);
}

bool supported() { return features().missing[0].empty(); }

}  // namespace vqkern_cpu

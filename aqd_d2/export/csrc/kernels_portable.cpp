// The "generic" (portable C++) and "popcnt" (x86-64 POPCNT instruction) kernel variants:
// one body, kernels_portable.inc, compiled twice with different function attributes.
#include <cstring>

#include "binary_conv.h"

namespace aqd_bconv {

namespace generic_impl {
#define AQD_FN static inline
#include "kernels_portable.inc"
#undef AQD_FN
}  // namespace generic_impl

bool generic_kernels(KernelSet* out) {
  out->pack_rows = generic_impl::pack_rows;
  out->conv_row = generic_impl::conv_row;
  return true;
}

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
namespace popcnt_impl {
#define AQD_FN static inline __attribute__((target("popcnt")))
#include "kernels_portable.inc"
#undef AQD_FN
}  // namespace popcnt_impl

bool popcnt_kernels(KernelSet* out) {
  out->pack_rows = popcnt_impl::pack_rows;
  out->conv_row = popcnt_impl::conv_row;
  return true;
}
#else
bool popcnt_kernels(KernelSet*) { return false; }
#endif

}  // namespace aqd_bconv

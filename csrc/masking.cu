// BEiT blockwise masks and BEVT tube masks for a whole batch in one launch (see masking.h).
//
// Layout: one warp per sample, kMaskWarpsPerBlock warps per thread block. Lane r holds row r of the
// sample's 2D mask as a 32-bit word (bit c = cell (r, c)), so a block's "new cells" count is one popcount
// per lane and a warp sum, and marking a block is one OR per lane.
//
// Randomness: Philox4x32-10 with key = seed and counter = (draw, stream, sample index, step). Draw
// numbers: attempt a of the blockwise loop uses draw a (4 words: area, aspect, top, left); the exact
// top-up's j-th cell uses draw kFillDraw + j; the tube uses draw kTubeDraw. Every lane can compute any
// draw, so lane k precomputes attempt base + k and the warp reads attempt a from lane a - base with shuffles:
// one Philox latency per 32 attempts instead of one per attempt (a 14x14 mask takes about 12 attempts).
//
// Steps of the kernel, per warp (all branches are warp-uniform: every lane sees the same draws):
//   1. pick the job and the sample; precompute the first 32 attempts' draws (one per lane)
//   2. the BEiT loop: while count < num: up to 10 attempts; area ~ U(min, max_mask) as random.uniform,
//      log-aspect ~ U(lo, hi); h = rint(sqrt(area * aspect)), w = rint(sqrt(area / aspect)); if h < H and
//      w < W, a uniform corner, new = cells of the block not yet masked (warp sum); accept if
//      0 < new <= max_mask; an iteration stops at its first accepted block; the loop stops when one adds nothing
//   3. exact: top up with uniformly random free cells, one at a time (warp prefix count finds the cell)
//   4. tube: start ~ U{0..slots-1}, length ~ U{len_min..len_max}, slots (start + t) % slots
//   5. write the input mask (batch, slots, H, W) and the target (batch, slots * scale, H, W) as bytes, 4 per
//      store where H*W % 4 == 0, every byte written (masked slots get the 2D mask, others zeros)
#include "masking.h"
#include "philox.cuh"

namespace bevt {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr uint32_t kFillDraw = 0x80000000u;  // attempts stay below 10 * 1024 draws
constexpr uint32_t kTubeDraw = 0xffffffffu;

__device__ __forceinline__ int warp_sum(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_add_sync(kFull, v);
#else
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
#endif
}

// the 2D mask's bytes (cells cell0 .. cell0 + n - 1, row-major), packed little-endian into one word
__device__ __forceinline__ uint32_t pack_cells(const uint32_t* rows, int cell0, int n, int W) {
  uint32_t v = 0;
  int r = cell0 / W, c = cell0 - r * W;
  for (int b = 0; b < n; ++b) {
    v |= ((rows[r] >> c) & 1u) << (8 * b);
    if (++c == W) {
      c = 0;
      ++r;
    }
  }
  return v;
}

__global__ void __launch_bounds__(kMaskWarpsPerBlock * 32) masks_kernel(const __grid_constant__ MaskParams p) {
  __shared__ uint32_t rows_s[kMaskWarpsPerBlock][32];

  // 1. job, sample, key
  const int lane = threadIdx.x & 31;
  const int wib = threadIdx.x >> 5;
  int g = blockIdx.x * kMaskWarpsPerBlock + wib;
  const bool second = g >= p.job[0].batch;
  if (second) g -= p.job[0].batch;
  const MaskJob& J = p.job[second ? 1 : 0];
  if (g >= J.batch) return;

  const uint32_t k0 = static_cast<uint32_t>(p.seed), k1 = static_cast<uint32_t>(p.seed >> 32);
  const uint32_t sample = J.index_offset + static_cast<uint32_t>(g);
  auto draw = [&](uint32_t n) { return philox4x32_10(U32x4{n, J.stream, sample, p.step}, k0, k1); };

  const int H = J.H, W = J.W;
  const float lo = J.log_aspect_lo, span = J.log_aspect_hi - J.log_aspect_lo;
  // lane k: attempt base + k's area fraction, sqrt(aspect), 1/sqrt(aspect), and raw words for top and left
  float ua_k, sa_k, isa_k;
  uint32_t rt_k, rl_k;
  uint32_t base = 0;
  auto precompute = [&]() {
    const U32x4 d = draw(base + lane);
    ua_k = philox_u01(d.x);
    const float half_log = 0.5f * (lo + span * philox_u01(d.y));
    sa_k = __expf(half_log);
    isa_k = __expf(-half_log);
    rt_k = d.z;
    rl_k = d.w;
  };
  precompute();

  // 2. the BEiT blockwise loop
  uint32_t row = 0;
  int count = 0, nblocks = 0;
  uint32_t attempt = 0;
  while (count < J.num_masking) {
    const int max_mask = min(J.num_masking - count, J.max_patches);
    int delta = 0;
    for (int t = 0; t < 10 && delta == 0; ++t, ++attempt) {
      if (attempt - base == 32) {
        base += 32;
        precompute();
      }
      const int src = static_cast<int>(attempt - base);
      const float ua = __shfl_sync(kFull, ua_k, src);
      const float sa = __shfl_sync(kFull, sa_k, src);
      const float isa = __shfl_sync(kFull, isa_k, src);
      const uint32_t rt = __shfl_sync(kFull, rt_k, src);
      const uint32_t rl = __shfl_sync(kFull, rl_k, src);
      const float area = static_cast<float>(J.min_patches) + static_cast<float>(max_mask - J.min_patches) * ua;
      const float root = sqrtf(area);
      const int h = __float2int_rn(root * sa);  // round half to even, as Python's round()
      const int w = __float2int_rn(root * isa);
      if (h < H && w < W) {
        const int top = philox_below(rt, H - h + 1);
        const int left = philox_below(rl, W - w + 1);
        const uint32_t cols = ((w == 0) ? 0u : ((1u << w) - 1u)) << left;  // w < W <= 32
        const bool in = static_cast<unsigned>(lane - top) < static_cast<unsigned>(h);
        const int fresh = warp_sum(in ? __popc(cols & ~row) : 0);
        if (fresh > 0 && fresh <= max_mask) {
          if (in) row |= cols;
          delta = fresh;
          if (J.trace != nullptr && lane == 0 && nblocks < J.trace_cap) {
            int32_t* tr = J.trace + (static_cast<size_t>(g) * J.trace_cap + nblocks) * 3;
            tr[0] = h;
            tr[1] = w;
            tr[2] = fresh;
          }
          ++nblocks;
        }
      }
    }
    if (delta == 0) break;
    count += delta;
  }

  // 3. exact count: the j-th extra cell is uniform among the free cells left
  if (J.exact) {
    const uint32_t lane_cells = lane < H ? ((W == 32) ? kFull : ((1u << W) - 1u)) : 0u;
    for (uint32_t j = 0; count < J.num_masking; ++j, ++count) {
      uint32_t free_bits = lane_cells & ~row;
      const int c = __popc(free_bits);
      int incl = c;  // inclusive prefix count of free cells over rows
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(kFull, incl, o);
        if (lane >= o) incl += v;
      }
      const int total = __shfl_sync(kFull, incl, 31);
      const int pick = philox_below(draw(kFillDraw + j).x, total);
      const int before = incl - c;
      if (pick >= before && pick < incl) {
        for (int k = pick - before; k > 0; --k) free_bits &= free_bits - 1;  // drop the lower free cells
        row |= free_bits & (~free_bits + 1u);                               // take the lowest left
      }
    }
  }

  // 4. the tube's slots
  uint64_t active = 1;
  if (J.tube) {
    const U32x4 d = draw(kTubeDraw);
    const int start = philox_below(d.x, J.slots);
    const int len = J.len_min + philox_below(d.y, J.len_max - J.len_min + 1);
    active = 0;
    for (int t = 0; t < len; ++t) active |= 1ull << ((start + t) % J.slots);
  }

  // 5. outputs
  rows_s[wib][lane] = row;
  __syncwarp();
  const uint32_t* rows = rows_s[wib];
  const int HW = H * W, S = J.slots, scale = J.scale;
  uint8_t* in_base = J.input + static_cast<size_t>(g) * S * HW;
  uint8_t* tg_base = J.target == nullptr ? nullptr : J.target + static_cast<size_t>(g) * S * scale * HW;
  if (J.word_stores) {
    const int words = HW >> 2;
    for (int wi = lane; wi < words; wi += 32) {
      const uint32_t v = pack_cells(rows, wi * 4, 4, W);
      for (int s = 0; s < S; ++s) {
        const uint32_t o = ((active >> s) & 1ull) ? v : 0u;
        reinterpret_cast<uint32_t*>(in_base + static_cast<size_t>(s) * HW)[wi] = o;
        if (tg_base != nullptr) {
          for (int k = 0; k < scale; ++k)
            reinterpret_cast<uint32_t*>(tg_base + static_cast<size_t>(s * scale + k) * HW)[wi] = o;
        }
      }
    }
  } else {
    for (int cell = lane; cell < HW; cell += 32) {
      const uint8_t v = static_cast<uint8_t>(pack_cells(rows, cell, 1, W));
      for (int s = 0; s < S; ++s) {
        const uint8_t o = ((active >> s) & 1ull) ? v : uint8_t{0};
        in_base[static_cast<size_t>(s) * HW + cell] = o;
        if (tg_base != nullptr) {
          for (int k = 0; k < scale; ++k) tg_base[static_cast<size_t>(s * scale + k) * HW + cell] = o;
        }
      }
    }
  }
}

const char* check_job(const MaskJob& j) {
  if (j.batch < 0) return "batch must be >= 0";
  if (j.batch == 0) return nullptr;
  if (j.input == nullptr) return "input mask pointer is null";
  if (j.H < 2 || j.W < 2 || j.H > kMaskMaxSide || j.W > kMaskMaxSide) return "grid sides must be in 2..32";
  if (j.num_masking < 1 || j.num_masking > j.H * j.W) return "num_masking must be in 1..H*W";
  if (j.min_patches < 1) return "min_patches must be >= 1";
  if (j.max_patches < 1) return "max_patches must be >= 1";
  if (!(j.log_aspect_lo <= j.log_aspect_hi)) return "log aspect range must satisfy lo <= hi";
  if (j.slots < 1 || j.slots > kMaskMaxSlots) return "slots must be in 1..64";
  if (j.scale < 1) return "scale must be >= 1";
  if (j.tube && (j.len_min < 1 || j.len_min > j.len_max || j.len_max > j.slots))
    return "tube lengths must satisfy 1 <= len_min <= len_max <= slots";
  if (!j.tube && j.slots != 1) return "a block-mask job has one slot";
  if (j.trace != nullptr && j.trace_cap < 1) return "trace_cap must be >= 1 with a trace";
  if (static_cast<uint64_t>(j.index_offset) + static_cast<uint64_t>(j.batch) > (1ull << 32))
    return "sample indices must stay below 2^32";
  return nullptr;
}

}  // namespace

cudaError_t launch_masks(MaskParams params, cudaStream_t stream, const char** why) {
  for (MaskJob& j : params.job) {
    if (const char* bad = check_job(j)) {
      if (why != nullptr) *why = bad;
      return cudaErrorInvalidValue;
    }
    const bool aligned = (reinterpret_cast<uintptr_t>(j.input) & 3u) == 0 &&
                         (reinterpret_cast<uintptr_t>(j.target) & 3u) == 0;
    j.word_stores = ((j.H * j.W) % 4 == 0) && aligned;
  }
  const long long total = static_cast<long long>(params.job[0].batch) + params.job[1].batch;
  if (total == 0) return cudaSuccess;
  const long long blocks = (total + kMaskWarpsPerBlock - 1) / kMaskWarpsPerBlock;
  if (blocks > 0x7fffffffLL) {
    if (why != nullptr) *why = "too many samples for one launch";
    return cudaErrorInvalidValue;
  }
  masks_kernel<<<static_cast<unsigned>(blocks), kMaskWarpsPerBlock * 32, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace bevt

// BEiT block masks and BEVT tube masks on the GPU: the launch interface (plain C++, no torch).
//
// One launch makes the masks of up to two jobs (e.g. the step's clips and its images); each sample is one
// warp, sample i of a job uses the Philox key (seed) and counter (draw, stream, index_offset + i, step),
// so a sample's mask does not depend on the batch size, the split of the batch or the launch it is in.
// The algorithm is bevt/ops/masking.py's reference generator; docs/kernels/masking.md has the design.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace bevt {

constexpr int kMaskMaxSide = 32;   // grid height and width: one 32-bit word per row, one row per lane
constexpr int kMaskMaxSlots = 64;  // temporal slots of a tube: one 64-bit set
constexpr int kMaskWarpsPerBlock = 4;

struct MaskJob {
  uint8_t* input = nullptr;   // bool (batch, slots, H, W), contiguous; block masks: slots = 1
  uint8_t* target = nullptr;  // bool (batch, slots * scale, H, W) or nullptr (block masks have none)
  int32_t* trace = nullptr;   // int32 (batch, trace_cap, 3): (h, w, new cells) of each accepted block; or nullptr
  int batch = 0;
  int H = 0, W = 0;
  int num_masking = 0;         // target masked count
  int min_patches = 0;         // min block area
  int max_patches = 0;         // max block area (BEiT's max_num_patches; the target count by default)
  float log_aspect_lo = 0.f;   // log of the min aspect ratio
  float log_aspect_hi = 0.f;   // log of the max aspect ratio
  int exact = 0;               // 1: top up with uniformly random free cells to exactly num_masking
  int tube = 0;                // 1: draw a tube (start, length) over the slots; 0: every slot is masked alike
  int slots = 1, scale = 1;    // temporal slots of the input mask; target = each slot repeated scale times
  int len_min = 1, len_max = 1;  // inclusive tube length range (tube = 1)
  int trace_cap = 0;
  uint32_t index_offset = 0;   // sample index of the job's first sample
  uint32_t stream = 0;         // Philox stream: 0 block masks, 1 tube masks (as the reference)
  int word_stores = 0;         // 1: H*W % 4 == 0 and both outputs 4-byte aligned (set by the launcher)
};

struct MaskParams {
  MaskJob job[2];
  uint64_t seed = 0;
  uint32_t step = 0;
};

// Checks the jobs' limits (returns cudaErrorInvalidValue with *why set when one is off), then launches
// one kernel on `stream` for job[0].batch + job[1].batch samples. Returns the launch's error.
cudaError_t launch_masks(MaskParams params, cudaStream_t stream, const char** why);

}  // namespace bevt

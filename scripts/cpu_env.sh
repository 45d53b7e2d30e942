# Sourced by the scripts that run torch on CPU (quickstart, tests, model training).
# glibc hands every freed buffer above its mmap threshold back to the kernel at once, so each
# large tensor of a training step is a fresh mmap whose pages the kernel zeroes again. Keeping
# freed memory in the process (what jemalloc or tcmalloc would do) made post-training on these
# 2-core machines 35 -> 27 s per step with the same numbers; evaluation did not change
# (README, "Install"). Values already in the environment win.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-1073741824}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-1073741824}"
export MALLOC_TOP_PAD_="${MALLOC_TOP_PAD_:-268435456}"

# Sourced by the scripts that run torch on CPU (quickstart, tests, model training).
# glibc returns every freed buffer above its mmap threshold to the OS at once, so each large
# tensor of a denoiser call is a fresh mmap whose pages the kernel zeroes again: on these
# 2-core machines a third of evaluation time went to the kernel. Keeping freed memory in the
# process (as jemalloc or tcmalloc would) made a 3-chunk evaluation 55 -> 43 s, same numbers
# (README, "Install"). Values already in the environment win.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-1073741824}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-1073741824}"
export MALLOC_TOP_PAD_="${MALLOC_TOP_PAD_:-268435456}"

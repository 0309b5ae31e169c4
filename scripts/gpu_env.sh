# Sourced (from the repository root) by the scripts/gpu_*.sh that run on the lent GPU machine:
# installs the carried diffusers wheel (.whl, see ../shared/ENV.md) into $SITE and puts it and
# src/ on PYTHONPATH (then $EXTRA_PYTHONPATH, if given), with quiet progress bars and unbuffered
# output; GPU_OMP_THREADS, if given, sets OMP_NUM_THREADS.
SITE=${SITE:-${TMPDIR:-/tmp}/site}
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="$SITE:$PWD/src${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}" TQDM_DISABLE=1 PYTHONUNBUFFERED=1
if [ -n "${GPU_OMP_THREADS:-}" ]; then export OMP_NUM_THREADS=$GPU_OMP_THREADS; fi
# Triton's and Inductor's caches (compiled kernels, autotune choices, compiled graphs) in /tmp,
# seeded once from archives an earlier session brought back (scripts/gpu_w8a8_check.sh writes them
# to OUT; copy them to .kernel_carry/ here and name .kernel_carry in carry): the SD w8a8 graph's
# first compile (~350 s cold) then reuses them
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
for _c in triton_cache:$TRITON_CACHE_DIR inductor_cache:$TORCHINDUCTOR_CACHE_DIR; do
  _a=.kernel_carry/${_c%%:*}.tgz; _d=${_c#*:}
  if [ -f "$_a" ] && [ ! -d "$_d" ]; then mkdir -p "$_d" && tar -xzf "$_a" -C "$_d"; fi
done

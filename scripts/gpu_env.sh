# Sourced (from the repository root) by the scripts/gpu_*.sh that run on the lent GPU machine:
# installs the carried diffusers wheel (.whl, see ../shared/ENV.md) into $SITE and puts it and
# src/ on PYTHONPATH (then $EXTRA_PYTHONPATH, if given), with quiet progress bars and unbuffered
# output; GPU_OMP_THREADS, if given, sets OMP_NUM_THREADS.
SITE=${SITE:-${TMPDIR:-/tmp}/site}
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="$SITE:$PWD/src${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}" TQDM_DISABLE=1 PYTHONUNBUFFERED=1
if [ -n "${GPU_OMP_THREADS:-}" ]; then export OMP_NUM_THREADS=$GPU_OMP_THREADS; fi

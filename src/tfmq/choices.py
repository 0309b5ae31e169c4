"""The names the command line offers (bit widths, samplers, methods, TFMQ-DM modes).

Kept free of heavy imports (no torch, no diffusers) so that ``tfmq --help``, ``tfmq --version``
and flag errors answer at once; the modules that implement these choices import their names from
here (``tests/test_cli.py`` checks they agree with the registries).
"""

#: Bit widths of integer quantization (32 = keep full precision, accepted separately).
SUPPORTED_BITS = tuple(range(2, 9))

#: Sampler names (``tfmq.sampling.SCHEDULERS`` maps them to diffusers schedulers).
SAMPLERS = ("ddim", "ddpm", "plms", "dpm-solver", "euler")

#: Finite set calibration modes and temporal-block modes of TFMQ-DM (see ``tfmq.config``).
FSC_MODES = ("none", "tib", "all")
TEMPORAL_MODES = ("tiar", "cache")

#: How the per-unit loops share work over several processes (``QuantConfig.recon_parallel``,
#: ``tfmq.calib.reconstruction.parallel_mode``).
RECON_PARALLEL_MODES = ("auto", "replicate", "rows", "batch")

#: Method name -> one-line description (the recipes themselves are in ``tfmq.recipes``).
METHOD_DESCRIPTIONS = {
    "naive": "plain PTQ: MSE-initialised per-channel weights, activation ranges from the calibration "
             "data (one set for all steps)",
    "tfmq": "TFMQ-DM: TIAR on the temporal information block first (or --temporal cache: its FP "
            "feature table), then BRECQ reconstruction of the other units on every "
            "interval_length-th step, then FSC activation ranges per sampling step (--fsc all / tib), "
            "then activation step-size learning of the quantizers that hold one set for all steps",
    "qdiff": "Q-Diffusion: time-step-aware calibration (calib_steps steps spread uniformly), split "
             "shortcut, BRECQ block reconstruction with AdaRound, then activation ranges and LSQ-like "
             "activation step-size learning per unit (use softmax_bits=16 for Stable Diffusion)",
}

#: Runtime backends of a quantized checkpoint (``tfmq.runtime.backends.BACKENDS``).
RUNTIME_BACKENDS = ("reference", "weight-only", "w8a8")

#: ``torch.compile`` modes for a loaded denoiser (``tfmq.runtime.compile_denoiser``, ``tfmq sample --compile``).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

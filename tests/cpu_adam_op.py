"""A stand-in for DeepSpeed's compiled ``cpu_adam`` op (what ``DeepSpeedCPUAdam`` calls its ``ds_opt_adam``) for
the suite's runs that offload the optimizer, the arithmetic of DeepSpeed's ``cpu_adam_impl.cpp`` written in torch.

DeepSpeed compiles the op with the first ``DeepSpeedCPUAdam`` a machine makes (a JIT build into
``~/.cache/torch_extensions``): 82 s of both cores, 152 CPU-seconds (measured 2026-12-07), which CI's clean machine
paid in every run of the suite, whose 2 cores are busy from start to end (the whole suite was 73 s slower from a
clean home than from one holding the build). The tests that offload the optimizer measure DeepSpeed's buffers,
partitions and swapping around the op (tests/unit/test_zero_infinity_host.py, the zero3_offload.json runs of
tests/integration/test_profile_measure.py), not Adam's arithmetic; DeepSpeed's own Python (``DeepSpeedCPUAdam``,
the ZeRO stages, the swappers) runs as it is. A run forked from the preloaded server with
``VLSCALE_TEST_CPU_ADAM=standin`` in its environment (:data:`ENV`) gets the stand-in (tests/preloaded.py installs
it); every other run builds and loads DeepSpeed's op as a user's does.

The update is made in place, chunk by chunk: no temporary over :data:`CHUNK` elements (the compiled op has none, and
test_profile_measure.py compares the measured peak with the prediction within 0.5 %).
"""

from __future__ import annotations

import math

ENV = "VLSCALE_TEST_CPU_ADAM"
CHUNK = 4096


class CpuAdamOp:
    """The op's functions as ``DeepSpeedCPUAdam`` calls them (create_adam, adam_update, destroy_adam)."""

    def __init__(self):
        self.adamw_mode: dict[int, bool] = {}

    def create_adam(self, opt_id, lr, beta1, beta2, eps, weight_decay, adamw_mode, should_log):
        self.adamw_mode[opt_id] = bool(adamw_mode)
        return 0

    def destroy_adam(self, opt_id):
        self.adamw_mode.pop(opt_id, None)
        return 0

    def adam_update(self, opt_id, step, lr, beta1, beta2, eps, weight_decay, bias_correction, params, grads,
                    exp_avg, exp_avg_sq):
        """Adam_Optimizer::Step_1 of cpu_adam_impl.cpp: L2 decay into the gradient (Adam) or decoupled (AdamW),
        the moments, then ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``."""
        adamw = self.adamw_mode[opt_id]
        bc1 = 1.0 - beta1 ** step if bias_correction else 1.0
        bc2 = 1.0 / math.sqrt(1.0 - beta2 ** step) if bias_correction else 1.0
        p, g, m, v = (t.view(-1) for t in (params, grads, exp_avg, exp_avg_sq))
        for s in range(0, p.numel(), CHUNK):
            pc, gc, mc, vc = p[s:s + CHUNK], g[s:s + CHUNK], m[s:s + CHUNK], v[s:s + CHUNK]
            if weight_decay > 0 and not adamw:
                gc = gc + pc * weight_decay
            mc.mul_(beta1).add_(gc, alpha=1.0 - beta1)
            vc.mul_(beta2).addcmul_(gc, gc, value=1.0 - beta2)
            denom = vc.sqrt().mul_(bc2).add_(eps)
            if weight_decay > 0 and adamw:
                pc.mul_(1.0 - lr * weight_decay)
            pc.addcdiv_(mc, denom, value=-lr / bc1)
        return 0

    def adam_rollback(self, *args, **kwargs):
        raise NotImplementedError(f"tests/cpu_adam_op.py's stand-in has no adam_rollback: run without {ENV}")


def install() -> None:
    """Make ``CPUAdamBuilder().load()`` return the stand-in in this process (no build)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    op = CpuAdamOp()
    CPUAdamBuilder.load = lambda self, verbose=True: op

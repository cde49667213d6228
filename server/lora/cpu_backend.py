"""The CPU kernel backend: every row of every step through the bf16 or int8 C kernels (`cpu_kernel.py`).

Decode rows (first in the step) go up to four tokens of one adapter at a time, prompt rows in blocks of up to 32
tokens of one adapter; one call of each per base projection (q/k/v and gate/up read x once for their targets),
on `KernelPlan`s packed here once at start-up over the pool's bf16 or int8 copies of the rank rows and its page
table. A token's LoRA arithmetic depends on its kind (decode or prompt), never on the rest of its batch.
A projection the plans do not cover, or activations the kernel cannot read, take the torch reference
instead (on the fp32 rows).
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from server.lora.backend import LoraBackend, LoraStep, StepRows
from server.lora.cpu_kernel import CpuLoraKernel, KernelPlan
from server.lora.pool import AdapterPool
from server.lora.torch_backend import TorchBackend, TorchStep
from server.model import fused_decode
from server.model.config import PROJECTIONS, Projection
from server.model.fused_decode import NativeLora


class CpuKernelBackend(LoraBackend):
    name = "cpu"

    def __init__(self, pool: AdapterPool, kernel: CpuLoraKernel):
        super().__init__(pool)
        copies = pool.kernel_stacks
        if copies is None:
            raise ValueError("the CPU kernel backend reads the pool's bf16 or int8 copies: "
                             "AdapterPool(kernel_copies=...)")
        self.kernel = kernel
        self.reference = TorchBackend(pool)
        # Each projection's plan, and each of its targets alone, per layer; keyed like the model's projections.
        self.plans: list[dict[Projection, KernelPlan]] = []
        config = pool.config
        for layer in copies.projections:
            plans = {}
            for targets in PROJECTIONS:
                st = layer[targets]
                plans[config.projection(targets)] = KernelPlan(
                    [(st.a_of(g), st.bt_of(g), st.scale[g], off) for g, off in enumerate(st.offsets[:-1])], st.pages,
                    st.row_scales(list(range(len(targets)))))
                for g, t in enumerate(targets):
                    plans.setdefault(config.projection((t,)), KernelPlan(
                        [(st.a_of(g), st.bt_of(g), st.scale[g], 0)], st.pages, st.row_scales([g])))
            self.plans.append(plans)
        # The same plans as one table for the fused decode driver, in its projection order.
        order = [config.projection(targets) for targets in PROJECTIONS]
        self.native_plans = fused_decode.lora_plans([
            (p.pages.data_ptr(), p.max_rank, p.in_features, p.count, p.address)
            for layer in self.plans for p in (layer[proj] for proj in order)])
        self.native_in_features = tuple(self.plans[0][proj].in_features for proj in order) if self.plans else ()
        self.native_function = fused_decode.function_address(kernel.decode_function(copies.dtype))
        self.native_prompt_function = fused_decode.function_address(kernel.prompt_function(copies.dtype))

    def prepare_rows(self, rows: StepRows) -> "CpuKernelStep":
        return CpuKernelStep(self, rows)


class CpuKernelStep(LoraStep):
    def __init__(self, backend: CpuKernelBackend, rows: StepRows):
        self.backend, self.rows = backend, rows
        kernel, any_plan = backend.kernel, next(iter(backend.plans[0].values()))
        self.decode_slots = torch.tensor(rows.adapter_slots[:rows.num_decode], dtype=torch.int64)
        kernel.check_slots(self.decode_slots, rows.rank, any_plan)
        self.prompt_blocks = kernel.prompt_blocks(rows.segments, rows.num_decode)
        kernel.check_slots(self.prompt_blocks[:, 2].contiguous(), rows.rank, any_plan)
        self._reference: Optional[TorchStep] = None  # prepared only if a projection needs it

    def native(self) -> Optional[NativeLora]:
        backend = self.backend
        if not backend.native_in_features:
            return None
        return NativeLora(backend.native_function, backend.native_prompt_function,
                          ctypes.addressof(backend.native_plans), backend.native_in_features, self.decode_slots,
                          self.prompt_blocks, self.rows.rank)

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, projection: Projection) -> torch.Tensor:
        kernel = self.backend.kernel
        plan = self.backend.plans[layer].get(projection)
        if plan is not None and kernel.accepts(y, x, plan, self.rows.segments.num_tokens):  # once for both kinds
            if self.decode_slots.shape[0]:
                kernel.run(y, x, self.decode_slots, plan, self.rows.rank)
            if self.prompt_blocks.shape[0]:
                kernel.run_prompt(y, x, self.prompt_blocks, plan, self.rows.rank)
            return y
        if self._reference is None:
            self._reference = self.backend.reference.prepare_rows(self.rows)
        return self._reference.apply(y, x, layer, projection)

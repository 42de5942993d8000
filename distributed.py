"""The parallel runtime: how the processes of a torchrun launch share one training run. Every layout offers
the training loop the same calls (forward_backward, optimizer_step, eval_loss, and load_optimizer_state and
full_state for checkpoints), so the loop reads the same under each:

    DataParallel   one process, or every process running the whole model on its share of each batch:
                   DDP (a full copy on each) or FSDP (each holding 1/N of every tensor);
    Pipeline       each process running a contiguous slice of the blocks (--pp), micro-batches streaming
                   through the slices.

The last section is the dry run's memory model: what one GPU holds under each layout.
"""
from contextlib import nullcontext
from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (autocast, gather_to_rank0, load_optimizer_state_by_name, optimizer_state_by_name,
                    optimizer_step)
from model import GPT, Block, GPTConfig, build_stage, describe_plan, plan_stages


# --- data parallelism: DDP and FSDP ---

class DataParallel:
    """The whole model on every process, each training on its share of every batch. `module` is the plain GPT:
    what the optimizer updates, evaluation runs and checkpoints save (its keys never carry `module.` or
    `_orig_mod.`); the training steps run through `wrapped`, which adds DDP and torch.compile when asked.

    DDP (Li et al. 2020): each process holds a full copy; backward averages the gradients across processes,
    so every copy takes the same step. FSDP (Zhao et al. 2023), in its second PyTorch version: each process
    stores 1/N of every tensor; a block's full weights are all-gathered just before it runs and freed after,
    and gradients are reduce-scattered, so each process updates only its shard.

    With a (pp = 1, dp, tp) device mesh and tp > 1, the model is first split across each group of tp processes
    (tensor_parallel below); these groups are the data-parallel replicas: sharded over dp by FSDP, or each a
    full copy whose gradients (plain and DTensor alike, by their local parts) are averaged over dp in one
    all-reduce per optimizer step, as Pipeline does, instead of by DDP."""

    def __init__(self, model: GPT, device: str, dtype: torch.dtype, local_rank: int, world_size: int,
                 fsdp: bool, compile: bool, accum: int, loss_chunk: int, mesh=None,
                 sequence_parallel: bool = False):
        self.module, self.device, self.dtype, self.fsdp = model.to(device), device, dtype, fsdp
        self.accum, self.loss_chunk = accum, loss_chunk
        self.tp = mesh["tp"].size() if mesh is not None else 1
        self.dp_group = None               # tp > 1 without FSDP: the replicas whose gradients we average
        if self.tp > 1:
            assert loss_chunk == 0, "tensor parallelism computes the loss with loss_parallel, not in chunks"
            tensor_parallel(model, mesh["tp"], sequence_parallel)
            if mesh["dp"].size() > 1 and not fsdp:
                self.dp_group = mesh.get_group("dp")
        if fsdp:
            # Imported here, when asked for: importing FSDP takes time that the other layouts need not spend.
            from torch.distributed.fsdp import fully_shard
            shard_over = {"mesh": mesh["dp"]} if self.tp > 1 else {}   # default: all processes
            for block in model.transformer.h:
                fully_shard(block, **shard_over)
            fully_shard(model, **shard_over)   # the rest: embeddings, ln_f and the (tied) head
        wrapped = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None) \
            if world_size > 1 and not fsdp and self.tp == 1 else model
        self.wrapped = torch.compile(wrapped) if compile else wrapped

    def named_parameters(self) -> list:
        return list(self.module.named_parameters())

    def loss_context(self):
        """Where the loss is computed, forward and backward: under tensor parallelism, loss_parallel, whose
        cross-entropy takes the logits split by vocabulary (each process's log-sum-exp over its V / tp
        logits, one all-reduce to combine them); else nothing."""
        if self.tp == 1:
            return nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel
        return loss_parallel()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, micro_step: int,
                         scaler: torch.amp.GradScaler) -> torch.Tensor:
        """Forward and backward of one micro-batch (B, T) of the accum in an optimizer step. Returns its mean
        loss divided by accum (detached): k micro-batches of mean losses, each divided by k, add up to the
        mean over the big batch, and so do their gradients."""
        # DDP averages gradients during backward; on all but the last micro-step there is nothing to
        # average yet (DDP decides at forward time, so no_sync wraps the forward too).
        is_last_micro_step = micro_step == self.accum - 1
        if self.fsdp:                      # FSDP's counterpart of no_sync: reduce only on the last micro-step
            self.module.set_requires_gradient_sync(is_last_micro_step)
        with self.wrapped.no_sync() if isinstance(self.wrapped, DDP) and not is_last_micro_step \
                else nullcontext(), self.loss_context():
            with autocast(self.device, self.dtype):
                loss = self.wrapped(x, y, self.loss_chunk) / self.accum
            scaler.scale(loss).backward()
        return local_value(loss.detach()) if self.tp > 1 else loss.detach()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float,
                       is_good: Callable[[torch.Tensor], bool]) -> torch.Tensor:
        """common.optimizer_step on the model: clip, step unless is_good(norm) says no, clear; the norm.
        Under tensor parallelism (which refuses float16, so no scaler): average the replicas' gradients, clip
        by the norm of the whole model's gradient, every shard of every tensor counted once."""
        if self.tp == 1:
            return optimizer_step(self.module, optimizer, scaler, grad_clip, is_good)
        params = [p for p in self.module.parameters() if p.grad is not None]   # the tied matrix once
        if self.dp_group is not None:
            average_gradients([local_value(p.grad) for p in params], self.dp_group)
        grad_norm = global_norm([p.grad for p in params])
        if grad_clip > 0:   # torch.nn.utils.clip_grads_with_norm_'s formula, on each (local) gradient
            scale = (grad_clip / (grad_norm + 1e-6)).clamp(max=1.0)
            for p in params:
                p.grad.mul_(scale)
        if is_good(grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss, through the plain model (evaluation runs under no_grad: no DDP needed)."""
        if self.tp == 1:
            return self.module(x, y, self.loss_chunk)
        with self.loss_context():
            return local_value(self.module(x, y, self.loss_chunk))

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, saved: dict) -> None:
        """Load a by-name optimizer state from a checkpoint (FSDP, TP: each process keeps its shards of it)."""
        if not self.fsdp and self.tp == 1:
            load_optimizer_state_by_name(self.named_parameters(), optimizer, saved)
        elif saved["state"]:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            if self.tp > 1:   # the file holds c_attn's rows as one process orders them
                saved = {**saved, "state": {name: {key: permute_qkv(t, self.tp) if is_qkv(name) and t.dim() else t
                                                   for key, t in state.items()}
                                            for name, state in saved["state"].items()}}
            set_optimizer_state_dict(self.module, optimizer, saved, options=StateDictOptions(full_state_dict=True))
        if self.tp > 1 and not self.fsdp:
            use_single_tensor_adamw(optimizer)

    def full_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
        """The whole model's state dict and by-name optimizer state, on rank 0 (None elsewhere under FSDP or
        TP, whose shards are gathered), so the checkpoint is the same file whatever the layout that wrote it."""
        if not self.fsdp and self.tp == 1:
            return self.module.state_dict(), optimizer_state_by_name(self.named_parameters(), optimizer)
        # FSDP's full state dicts name the optimizer state by parameter, as ours does.
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.module, options=options)
        # Before the first step AdamW has no state, and get_optimizer_state_dict would create it by taking
        # a step with lr=0, which advances AdamW's step count and so changes every later update.
        optimizer_state = get_optimizer_state_dict(self.module, optimizer, options=options) if optimizer.state \
            else optimizer_state_by_name(self.named_parameters(), optimizer)
        if dist.get_rank() != 0:
            return None, None
        if self.tp > 1:   # c_attn's rows back in one process's order (tensor_parallel reordered them)
            def unpermute(name: str, t):
                return permute_qkv(t, self.tp, inverse=True) if is_qkv(name) and t.dim() else t
            weights = {name: unpermute(name, t) for name, t in weights.items()}
            optimizer_state = {**optimizer_state, "state": {
                name: {key: unpermute(name, t) for key, t in state.items()}
                for name, state in optimizer_state["state"].items()}}
        return weights, optimizer_state


# DTensor is imported where used, under tensor parallelism only: the import takes ~2 s that others need not spend.

def local_value(t: torch.Tensor) -> torch.Tensor:
    """t, or this process's part of it when t is a DTensor (a replicated one, like loss_parallel's loss, is
    the whole value on every process)."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def average_gradients(grads: list[torch.Tensor], group) -> None:
    """Average the tensors grads in place over the processes of group, in one all-reduce of a flat copy."""
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, group=group)   # a sum: gloo has no average
    flat /= dist.get_world_size(group)
    for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(averaged.view_as(g))


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of the whole gradient: sqrt of the sum of every entry's square, over plain tensors (counted
    once: the same on every process) and DTensors (their shards on the processes that hold them, each entry
    once, whatever the mesh). torch.nn.utils.get_total_norm takes all-plain or all-DTensor lists only."""
    from torch.distributed.tensor import DTensor
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else None)
    for g in grads:
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        total += (norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2
    return total.sqrt()


def use_single_tensor_adamw(optimizer: torch.optim.Optimizer) -> None:
    """Let AdamW update one tensor at a time: its multi-tensor (foreach) kernels refuse a list that mixes
    DTensors and plain tensors, as tensor parallelism without FSDP leaves them (replicated LayerNorms,
    biases and the position embedding stay plain)."""
    for group in optimizer.param_groups:
        group["foreach"] = False


# --- one device mesh for every layout ---

def device_mesh(device_type: str, world_size: int, pp: int, tp: int):
    """The processes as a 3-D grid (pp, dp, tp) with dims named "pp", "dp", "tp", dp = world_size / (pp tp):
    global rank = (pp_rank * dp + dp_rank) * tp + tp_rank. The tensor-parallel ranks are adjacent, so with
    tp <= GPUs per node they share a node and its fast links: TP talks in every block, forward and backward;
    data parallelism once per step; the pipeline sends one activation per micro-batch (Narayanan et al. 2021,
    section 3, who lay Megatron-LM out the same way)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (pp, world_size // (pp * tp), tp), mesh_dim_names=("pp", "dp", "tp"))


# --- tensor parallelism ---
#
# With --tp=N, every matrix of a block is split across N processes (Megatron-LM, Shoeybi et al. 2019, section 3):
# the MLP's c_fc by columns (each process computes N-th of the 4C hidden units) and its c_proj by rows (each
# process multiplies its hidden units by its rows; one all-reduce sums the N partial outputs); attention the
# same way by heads: q, k and v by columns, so each process holds H / N whole heads and attends with them
# alone, and c_proj by rows. Two all-reduces per block forward, two backward; no other communication.
# Everything between the blocks' matmuls (LayerNorms, residual adds, dropout) runs replicated on the N
# processes. Sequence parallelism (Korthikanti et al. 2022, section 4.2.2) instead splits those along the
# sequence: each all-reduce becomes a reduce-scatter to the process's T / N positions and an all-gather back
# before the next matmul (the same bytes on the wire), and the LayerNorms' and dropouts' activations take 1/N
# of the memory.
# The LM head is split by vocabulary (each process computes V / N of the logits) and the loss is computed from
# the split logits (torch.distributed.tensor.parallel.loss_parallel), so the (B, T, V) logits never exist
# whole on one process. The tied token embedding is the same (V, C) matrix split the same way by rows.
# torch.distributed.tensor.parallel does the splitting: each split weight becomes a DTensor, a tensor that
# knows its shards and which collectives its operations need.
# Dropout: the processes of a tensor-parallel group seed their generators alike (train.py), so they draw the
# same masks on the activations they replicate, which must stay equal. They draw them on their own heads'
# attention weights (and under sequence parallelism, their own slice of the sequence) too, so head h and head
# h + H / tp share a mask; Megatron-LM gives each rank its own generator for those (Shoeybi et al. 2019,
# section 3). Results still match one process only without dropout (as for DDP, whose ranks draw their own).

def permute_qkv(weight: torch.Tensor, tp: int, inverse: bool = False) -> torch.Tensor:
    """c_attn's rows (weight (3C, C) or bias (3C,)) reordered from [q; k; v] to [q_0; k_0; v_0; q_1; ...;
    v_{tp-1}], where q_r holds rows r C/tp .. (r+1) C/tp - 1 of q: the heads of tensor-parallel rank r. Then a
    plain split of the rows into tp equal blocks gives each rank its own heads' q, k and v, which it splits
    by thirds (model.CausalSelfAttention). inverse: the other way back. The identity when tp = 1."""
    rest = weight.shape[1:]
    if inverse:                                                   # (tp, 3, C/tp, ...) -> (3, tp, C/tp, ...)
        return weight.reshape(tp, 3, -1, *rest).transpose(0, 1).reshape(weight.shape)
    return weight.reshape(3, tp, -1, *rest).transpose(0, 1).reshape(weight.shape)   # (3, tp, ...) -> (tp, 3, ...)


def is_qkv(name: str) -> bool:
    """Whether a state-dict entry is c_attn's weight or bias, whose rows permute_qkv reorders."""
    return name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias")


def tensor_parallel(model: torch.nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """Split `model` (a GPT or a GPTStage: blocks in .transformer.h, with wte, wpe, ln_f and lm_head where it
    holds them) in place across the processes of the 1-D mesh tp_mesh, Megatron-style (see above). Its
    weights must be the full model's, the same on every process; c_attn's rows are reordered first
    (permute_qkv), so checkpoints must undo that (full_state). With sequence_parallel, the LayerNorms and
    the residual stream between the blocks are split along T."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleOutput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)
    tp, tp_rank = tp_mesh.size(), tp_mesh.get_local_rank()
    # Between the blocks, the residual stream is replicated (B, T, C), or (B, T / tp, C) on each process
    # under sequence parallelism; the row-parallel projections that write into it sum their partial
    # outputs onto that layout (all-reduce, or reduce-scatter).
    stream = Shard(1) if sequence_parallel else Replicate()
    blocks = model.transformer.h.values() if isinstance(model.transformer.h, torch.nn.ModuleDict) \
        else model.transformer.h
    for block in blocks:
        attn = block.attn
        with torch.no_grad():
            attn.c_attn.weight.copy_(permute_qkv(attn.c_attn.weight, tp))
            if attn.c_attn.bias is not None:
                attn.c_attn.bias.copy_(permute_qkv(attn.c_attn.bias, tp))
        attn.first_head = tp_rank * attn.n_head // tp
        plan = {"attn.c_attn": ColwiseParallel(input_layouts=stream),
                "attn.c_proj": RowwiseParallel(output_layouts=stream)}
        for mlp in ("mlp", "mlp_0") if block.macaron else ("mlp",):
            plan |= {f"{mlp}.c_fc": ColwiseParallel(input_layouts=stream),
                     f"{mlp}.c_proj": RowwiseParallel(output_layouts=stream)}
        if sequence_parallel and not block.rezero:   # ReZero's blocks have no LayerNorm (nn.Identity)
            plan |= {name: SequenceParallel() for name in ("ln_0", "ln_1", "ln_2") if hasattr(block, name)}
        parallelize_module(block, tp_mesh, plan)
    transformer, plan = model.transformer, {}
    tied = "wte" in transformer and hasattr(model, "lm_head") and transformer.wte.weight is model.lm_head.weight
    if "wte" in transformer:
        # Each process looks up the tokens of its part of the vocabulary (zeros for the others); the sum over
        # the processes is every token's embedding. Replicated, so the position embedding (replicated, small)
        # and dropout apply as on one process; then each process keeps its slice of the sequence.
        plan["transformer.wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        if sequence_parallel:
            plan["transformer.drop"] = PrepareModuleOutput(output_layouts=Replicate(),
                                                           desired_output_layouts=Shard(1))
    if hasattr(model, "lm_head"):
        if sequence_parallel:
            plan["transformer.ln_f"] = SequenceParallel()
        # The logits stay split by vocabulary (a DTensor, Shard(-1)) for loss_parallel's cross-entropy.
        plan["lm_head"] = ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, plan)
    if tied:   # each style made its own parameter of the one (V, C) matrix: make them one again
        transformer.wte.weight = model.lm_head.weight


# --- pipeline parallelism ---
#
# With --pp=P, the blocks are cut into P contiguous stages (model.plan_stages) and process p runs stage p.
# A batch is cut into micro-batches that flow through the stages: stage p works on micro-batch m while
# stage p+1 works on m-1. GPipe (Huang et al. 2019) runs every forward, then every backward; 1F1B (Narayanan
# et al. 2019) alternates them once the pipe is full, so at most P micro-batches' activations are alive at
# once; interleaved 1F1B (Narayanan et al. 2021) gives each process several smaller stages to shrink the
# idle "bubble" at both ends. torch.distributed.pipelining runs the schedules; we build the stage modules
# ourselves (no tracer).
# With tied embeddings, the first and last stages each hold a copy of wte; their gradients are summed
# over a two-process group every step, so the copies take identical steps and stay equal. (Colossal-AI
# keeps one shared module; torchtitan refuses tied embeddings under pipelining.)
# With P x D processes, the D replicas of a stage average their gradients once per optimizer step, in
# Pipeline.optimizer_step, as DDP would. Not through DDP itself: on the first step the schedule infers the
# stages' shapes by running the module's forward outside no_sync, which leaves DDP expecting one more backward;
# unless a forward falls between a stage's first and last backward (1F1B with more micro-batches than
# stages), DDP records each parameter twice and stops at its next forward with an internal assert
# ("rebuilt parameter indices size is not same as original model parameters size", torch 2.13): GPipe,
# interleaved 1F1B, and 1F1B with as many micro-batches as stages.

def scaled_cross_entropy(scale: float):
    """The pipeline's loss function: each micro-batch's mean loss times scale = 1 / (micro-batches per
    optimizer step), so the summed gradients are those of the whole batch's mean loss."""
    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:   # (b, T, V), (b, T)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1) * scale
    return loss_fn


class AutocastForward(torch.nn.Module):
    """A pipeline stage's module with its forward run under autocast to dtype (a no-op for fp32). The schedule
    runs every micro-batch's forward and backward inside one schedule.step() call, and PyTorch's AMP docs
    (torch.autocast) say autocast should wrap only the forward passes and the loss: "Backward passes under
    autocast are not recommended" (backward ops already run in the dtype autocast chose for their forward
    ops). So autocast goes inside each stage's forward, and step() runs outside it. Only the schedule sees
    this wrapper: Pipeline.module keeps the stages themselves, so parameter names stay the GPT's."""

    def __init__(self, module: torch.nn.Module, device: str, dtype: torch.dtype):
        super().__init__()
        self.module, self.device, self.dtype = module, device, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            return self.module(x)


@dataclass
class Pipeline:
    """What one process holds of the pipeline, and the steps of training through it."""
    module: torch.nn.ModuleList           # its GPTStage modules (one, or several when interleaved)
    schedule: object                      # the torch.distributed.pipelining schedule
    holds_first: bool                     # runs stage 0: feeds the token ids
    holds_last: bool                      # runs the last stage: computes the loss
    pp_group: object                      # the processes of this pipeline
    tie_group: object | None              # {first stage, last stage} of this pipeline, when wte is tied
    dp_rank: int                          # which data-parallel replica of the stages this process belongs to
    dp_group: object | None               # the data-parallel replicas of these stages, when there are several
    accum: int                            # schedule steps (each of n_microbatches micro-batches) per update
    device: str                           # where this process's stages run

    def named_parameters(self) -> list:
        return [(name, p) for stage in self.module for name, p in stage.named_parameters()]

    def tied_copy(self) -> torch.nn.Parameter:
        """This process's copy of the tied embedding matrix: wte on the first stage, lm_head on the last."""
        return self.module[0].transformer.wte.weight if self.holds_first else self.module[-1].lm_head.weight

    def run(self, x: torch.Tensor, y: torch.Tensor, train: bool) -> torch.Tensor:
        """Run one batch through the pipeline (forward and backward when train) and return the sum of the
        micro-batch losses the schedule computed: non-zero on the last stage only. Call it outside autocast:
        the stages apply it to their forward passes (AutocastForward)."""
        losses = []
        run = self.schedule.step if train else self.schedule.eval
        run(*([x] if self.holds_first else []), target=y if self.holds_last else None, losses=losses)
        return torch.stack(losses).sum().detach() if self.holds_last else torch.zeros((), device=x.device)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, micro_step: int,
                         scaler: torch.amp.GradScaler) -> torch.Tensor:
        """Forward and backward of every micro-batch of the batch (x, y), the losses scaled by the schedule's
        loss function (scaled_cross_entropy). micro_step and scaler play no part: --pp refuses float16."""
        return self.run(x, y, train=True)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float,
                       is_good: Callable[[torch.Tensor], bool]) -> torch.Tensor:
        """Average the gradients over the data-parallel replicas, sum the tied copies' gradients, clip by the
        norm of the whole model's gradient (all stages, the tied matrix counted once), step unless
        is_good(norm) says no, clear. Returns the norm before clipping, the same on every process."""
        named_params = self.named_parameters()
        if self.dp_group is not None:   # every replica's stages hold the same parameters, in the same order
            grads = [p.grad for _, p in named_params if p.grad is not None]
            flat = torch.cat([g.flatten() for g in grads])    # one all-reduce, not one per tensor
            dist.all_reduce(flat, group=self.dp_group)        # a sum: gloo has no average
            flat /= dist.get_world_size(self.dp_group)
            for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(averaged.view_as(g))
        if self.tie_group is not None:
            dist.all_reduce(self.tied_copy().grad, group=self.tie_group)   # grad(embedding) + grad(head)
        counted = [p.grad for name, p in named_params if p.grad is not None
                   and not (self.tie_group is not None and name == "lm_head.weight")]
        norm_squared = torch.nn.utils.get_total_norm(counted) ** 2 if counted else torch.zeros(())
        dist.all_reduce(norm_squared, group=self.pp_group)
        grad_norm = norm_squared.sqrt()
        if grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_([p for _, p in named_params], grad_clip, grad_norm)
        if is_good(grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss, computed on the last stage and shared with the others."""
        loss = self.run(x, y, train=False) * self.accum       # undo the 1 / accum of the loss scale
        dist.all_reduce(loss, group=self.pp_group)
        return loss

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, saved: dict) -> None:
        """Load this process's part of a by-name optimizer state (the last stage's copy of a tied wte takes
        wte's state)."""
        aliases = {"lm_head.weight": "transformer.wte.weight"} if self.tie_group is not None else {}
        load_optimizer_state_by_name(self.named_parameters(), optimizer, saved, aliases)

    def full_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
        """The whole model's state dict and by-name optimizer state on rank 0 (None elsewhere): the stages of
        the first data-parallel replica, gathered and merged, so the checkpoint is the same file as one
        process writes."""
        weights = {name: t for stage in self.module for name, t in stage.state_dict().items()}
        optimizer_state = optimizer_state_by_name(self.named_parameters(), optimizer)
        if self.tie_group is not None and self.holds_last:   # the copy's state equals wte's on the first stage
            optimizer_state["state"].pop("lm_head.weight", None)
            for group in optimizer_state["param_groups"]:
                group["params"] = [name for name in group["params"] if name != "lm_head.weight"]
        shards = gather_to_rank0((weights, optimizer_state) if self.dp_rank == 0 else None)
        if dist.get_rank() != 0:
            return None, None
        shards = [shard for shard in shards if shard is not None]
        weights = {name: t.cpu() for shard_weights, _ in shards for name, t in shard_weights.items()}
        merged = {"state": {}, "param_groups": [dict(g, params=[]) for g in shards[0][1]["param_groups"]]}
        for _, shard_state in shards:
            merged["state"].update(shard_state["state"])
            for group, shard_group in zip(merged["param_groups"], shard_state["param_groups"]):
                group["params"] += shard_group["params"]
        return weights, merged


def build_pipeline(model_cfg: GPTConfig, full_state: dict, mesh, device: str, dtype: torch.dtype, schedule: str,
                   balance: str, n_microbatches: int, virtual_stages: int, accum: int) -> Pipeline:
    """This process's stages of a (pp, dp) device mesh, with weights from a full GPT state dict, each stage's
    forward under autocast to dtype, and the schedule that drives them, run `accum` times per optimizer
    step with n_microbatches micro-batches each (virtual_stages: stages per process, interleaved only).
    Data-parallel replicas average their gradients in Pipeline.optimizer_step. Call its schedule outside
    autocast."""
    # Imported here, like FSDP: importing the pipelining package takes time that other layouts need not spend.
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    pp, dp_size = mesh.size(0), mesh.size(1)
    pp_rank, dp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    n_virtual = virtual_stages if schedule == "interleaved_1f1b" else 1
    plan = plan_stages(model_cfg, pp * n_virtual, balance)
    if dist.get_rank() == 0:
        print("\n".join(describe_plan(model_cfg, plan, balance)))
    stage_ids = [pp_rank + v * pp for v in range(n_virtual)]      # interleaved: stages p, p+P, p+2P, ...
    modules = [build_stage(model_cfg, plan, i, full_state).to(device) for i in stage_ids]
    stages = [PipelineStage(AutocastForward(m, device, dtype), i, len(plan), torch.device(device),
                            group=mesh.get_group("pp")) for m, i in zip(modules, stage_ids)]
    loss_fn = scaled_cross_entropy(1 / (n_microbatches * accum))
    # scale_grads=False: the loss is already scaled, and gradients accumulate over several step() calls.
    if schedule == "interleaved_1f1b":
        pipeline_schedule = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn, scale_grads=False)
    else:
        schedule_class = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        pipeline_schedule = schedule_class(stages[0], n_microbatches, loss_fn, scale_grads=False)
    # Every process creates every group, in the same order (a rule of torch.distributed.new_group).
    tie_group = None
    if model_cfg.tie_embeddings:
        for d in range(dp_size):
            group = dist.new_group([d, (pp - 1) * dp_size + d])   # global rank = pp_rank * dp + dp_rank
            if dp_rank == d and pp_rank in (0, pp - 1):
                tie_group = group
    return Pipeline(torch.nn.ModuleList(modules), pipeline_schedule, holds_first=pp_rank == 0,
                    holds_last=pp_rank == pp - 1, pp_group=mesh.get_group("pp"), tie_group=tie_group,
                    dp_rank=dp_rank, dp_group=mesh.get_group("dp") if dp_size > 1 else None, accum=accum,
                    device=device)


# --- the dry run's memory model: what one GPU holds ---
#
# Memory on a GPU while training = weights, gradients and AdamW's two moments (all fp32: 4 + 4 + 8 bytes per
# parameter), the 16-bit copies of the matmul weights that autocast makes and the matmuls keep for backward
# (2 bytes per parameter), and the activations autograd saves for backward. The activations are counted from
# what our code saves, tensor by tensor, as Korthikanti et al. 2022 (section 4.1) do for Megatron's block.
# Not counted: the CUDA context and kernels' workspaces, allocator fragmentation, dropout masks.

GIB = 2 ** 30

# Memory of each GPU in common.PEAK_BF16_FLOPS, in GiB, for the variant named (the A100 also comes with 40 GB;
# the V100 16 GB is the card GPT-X trained on, there is a 32 GB one). train.py --dry_run warns when a plan
# needs more.
GPU_MEMORY_GIB = {"H100 PCIe": 80, "H100 NVL": 94, "H100": 80, "H200": 141, "A100": 80, "A10": 24, "L40S": 48,
                  "L4": 24, "V100": 16}


def block_activation_bytes(config: GPTConfig, b: int, T: int, act_bytes: int) -> int:
    """Bytes one block saves for backward on a micro-batch of b sequences of T tokens. act_bytes: 2 under
    16-bit autocast (matmul inputs and outputs), 4 in fp32; the residual stream and the LayerNorm inputs
    are fp32 either way. Counted per (b, T, C) tensor in Block's forward."""
    C, H, a = config.n_embd, config.n_head, act_bytes
    btc = b * T * C
    mlp = 9 * a * btc                                   # c_fc input (C), GELU input (4C), c_proj input (4C)
    norms = 0 if config.rezero else 4 * btc             # each LayerNorm saves its fp32 input
    rezero = a * btc if config.rezero else 0            # alpha * branch saves the branch
    total = 2 * norms + 2 * rezero + 2 * a * btc + 3 * a * btc + mlp   # c_attn, c_proj inputs; q, k, v
    if config.sparse_topk or config.realformer or not config.sdpa:   # the explicit path keeps the T x T weights
        total += b * H * T * T * (4 + (a if a < 4 else 0) + (1 if config.sparse_topk else 0))   # fp32 softmax,
    else:                                                            # its 16-bit copy, the top-k mask
        total += a * btc + (a * H * T * T if config.position == "alibi" else 0)   # SDPA's output; ALiBi's mask
    if config.position == "rope":
        total += 2 * a * btc                            # the rotated q and k
    if config.macaron:
        total += norms + rezero + mlp                   # the second feed-forward
    return total


def head_activation_bytes(config: GPTConfig, b: int, T: int, act_bytes: int, loss_chunk: int) -> int:
    """Bytes the final LayerNorm, the LM head and the loss hold at their peak, early in backward. The plain path
    keeps the fp32 log-probabilities (B, T, V), and log_softmax's backward holds them, their gradient and the
    logits' gradient at once (12 bytes per logit); the chunked one keeps d loss / d x and a (V, C) fp32 weight
    gradient, and two (chunk, V) fp32 buffers at a time."""
    C, V, a = config.n_embd, config.vocab_size, act_bytes
    btc, btv = b * T * C, b * T * V
    if loss_chunk > 0:
        return 4 * btc + 4 * btc + 4 * V * C + 2 * 4 * loss_chunk * V
    return 4 * btc + a * btc + 12 * btv


def microbatches_in_flight(schedule: str, pp: int, n_microbatches: int, virtual_stages: int,
                           pp_rank: int) -> int:
    """Micro-batches whose activations pipeline rank pp_rank of pp holds at once (in virtual-stage chunks when
    interleaved): GPipe runs every forward first; 1F1B (Narayanan et al. 2019) starts backward after P - p
    forwards; interleaved 1F1B warms up with 2(P - p - 1) + (V - 1)P chunks (Narayanan et al. 2021)."""
    P, n = pp, n_microbatches
    if schedule == "gpipe":
        return n
    if schedule == "1f1b":
        return min(n, P - pp_rank)
    V = virtual_stages
    return min(n * V, 2 * (P - pp_rank - 1) + (V - 1) * P + 1)


def count_params(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters, parameters of nn.Linear weights: the ones autocast copies to 16 bits)."""
    linear = sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    return sum(p.numel() for p in module.parameters()), linear


def memory_estimate(config: GPTConfig, module: torch.nn.Module, n_blocks: int, holds_last: bool, micro_batch: int,
                    in_flight: int, head_in_flight: int, act_bytes: int, loss_chunk: int, shards: int,
                    data_parallel: bool) -> dict[str, float]:
    """Estimated peak bytes on one GPU, by kind, for a module (the GPT, or one rank's pipeline stages) built on
    the meta device: n_blocks blocks per stage, each keeping the activations of in_flight micro-batches of
    micro_batch sequences (the head's: head_in_flight). shards > 1: FSDP splits weights, gradients and AdamW
    states, and gathers two blocks at a time (the current and the prefetched next). data_parallel: DDP keeps
    its gradient buckets beside .grad (under --pp, the flat copy the replicas average)."""
    T = config.block_size
    params, linear = count_params(module)
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    block_params = count_params(blocks[0])[0] if blocks else 0
    estimate = {"weights": 4 * params / shards + (2 * 4 * block_params if shards > 1 else 0),
                "gradients": 4 * params / shards * (2 if data_parallel and shards == 1 else 1),
                "AdamW": 8 * params / shards}
    per_block = block_activation_bytes(config, micro_batch, T, act_bytes)
    if config.activation_checkpointing:   # each block keeps its fp32 input; one is rebuilt at a time
        activations = n_blocks * 4 * micro_batch * T * config.n_embd + per_block
        copies = linear - (n_blocks - 1) * count_params(blocks[0])[1] if blocks else linear
    else:
        activations, copies = n_blocks * per_block, linear
    activations *= in_flight
    if holds_last:
        activations += head_activation_bytes(config, micro_batch, T, act_bytes, loss_chunk) * head_in_flight
    estimate["16-bit weight copies"] = 2 * copies if act_bytes == 2 else 0
    estimate["activations"] = activations
    return estimate

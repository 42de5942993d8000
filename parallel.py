"""Model parallelism on one (pp, dp, tp) device mesh: tensor parallelism (each block's matrices split across
processes, Megatron-LM) and pipeline stages (each process a contiguous slice of the blocks), and the gradient
arithmetic they share with data parallelism (runtime.DataParallel): DTensor pieces, averaging over replicas,
one global norm with every piece counted once; and, for every layout, the weights of a model laid out on the
meta device made in place, and saved in pieces.

The dry run's memory model, what one GPU holds under each layout, is planner.py's.
"""
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoints import optimizer_state_by_name
from model import GPTConfig, GPTStage, describe_plan, init_buffers, plan_stages
from processes import all_ranks_mean, autocast


# --- gradients across processes ---

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


def copies_per_piece(t: torch.Tensor, stage_processes: int) -> int:
    """How many of the stage_processes processes running a stage (its dp x tp processes) hold the same piece
    of t: all of them for a plain tensor; for a DTensor, those outside its mesh (a tensor FSDP shards over dp
    alone is whole across tp) times its mesh dims that replicate it (a placement that shards, FSDP's strided
    shard included, splits the copies). Dividing each piece's squared norm by this counts every element of
    the stage once when the processes' sums are added."""
    from torch.distributed.tensor import DTensor
    if not isinstance(t, DTensor):
        return stage_processes
    assert not any(p.is_partial() for p in t.placements), "gradients are reduced before the norm is taken"
    replicated = [size for size, placement in zip(t.device_mesh.shape, t.placements) if placement.is_replicate()]
    return stage_processes // t.device_mesh.size() * math.prod(replicated)


def clip_by_global_norm(counted: list[torch.Tensor], scaled: list[torch.Tensor], stage_processes: int,
                        grad_clip: float, device: str) -> torch.Tensor:
    """The 2-norm of the whole model's gradient, the same on every process: each process adds the squares of
    its pieces of the `counted` gradients (plain tensors or DTensors), each divided by the processes holding
    that piece (copies_per_piece), and one all-reduce over every process sums them. With grad_clip > 0 every
    `scaled` gradient is then multiplied in place by torch.nn.utils.clip_grads_with_norm_'s factor (on its
    local piece). counted leaves out a second copy of a tied matrix; scaled includes it."""
    norm_squared = sum((local_value(g).float().square().sum() / copies_per_piece(g, stage_processes)
                        for g in counted), torch.zeros((), device=device))
    dist.all_reduce(norm_squared)
    grad_norm = norm_squared.sqrt()
    if grad_clip > 0:
        scale = (grad_clip / (grad_norm + 1e-6)).clamp(max=1.0)
        for g in scaled:
            local_value(g).mul_(scale)
    return grad_norm


def lay_out_like_parameters(params: list[torch.nn.Parameter]) -> None:
    """Give each DTensor gradient its parameter's placements. A tensor-parallel embedding's gradient comes back
    whole on every process (Replicate), while the head's is split by vocabulary like its weight: the tied
    copies' gradients must be split alike before their pieces are summed. (From whole to split is a slice,
    no communication; AdamW would redistribute the gradient the same way.)"""
    from torch.distributed.tensor import DTensor
    for p in params:
        if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
            p.grad = p.grad.redistribute(p.device_mesh, p.placements)


def reduce_clip_and_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, grad_clip: float,
                         is_good: Callable[[torch.Tensor], bool], stage_processes: int, device: str, dp_group=None,
                         tie_group=None, tied: torch.nn.Parameter | None = None,
                         count_tied: bool = True) -> torch.Tensor:
    """The optimizer step of tensor parallelism and pipelines (no gradient scaler: they refuse float16) on this
    process's params: average the gradients over dp_group's replicas (None: one, or FSDP reduced them), sum
    the tied copies' over tie_group (tied: this process's copy, left out of the norm unless count_tied), clip
    by the whole model's norm (clip_by_global_norm), step unless is_good(norm) says no, clear; the norm."""
    params = [p for p in params if p.grad is not None]
    lay_out_like_parameters(params)
    if dp_group is not None:    # every replica holds the same parameters, in the same order
        average_gradients([local_value(p.grad) for p in params], dp_group)
    if tie_group is not None:   # grad(embedding) + grad(head): the copies are laid out alike, so the pieces match
        dist.all_reduce(local_value(tied.grad), group=tie_group)
    counted = [p.grad for p in params if count_tied or p is not tied]
    grad_norm = clip_by_global_norm(counted, [p.grad for p in params], stage_processes, grad_clip, device)
    if is_good(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def use_single_tensor_adamw(optimizer: torch.optim.Optimizer) -> None:
    """Let AdamW update one tensor at a time: its multi-tensor kernels, fused (CUDA's default here, and PyTorch
    takes it before foreach) and foreach alike, refuse a list that mixes DTensors and plain tensors, as tensor
    parallelism without FSDP leaves them (replicated LayerNorms, biases and the position embedding stay plain)."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = False, False


# --- the weights of a laid-out model: made where they live, saved in pieces ---
#
# A model larger than one device cannot be built whole and then cut: it is built on the meta device (shapes,
# no memory), laid out (a pipeline stage, tensor_parallel, fully_shard: each parameter becomes what this
# process holds of it, still without memory), and only then does each process allocate its pieces and fill
# them (materialise), one whole tensor at a time: from model.initial_value, or from a checkpoint
# (checkpoints.TensorReader). Checkpoints go the other way: each process saves its rows of every tensor,
# in one process's order (state_pieces), one whole tensor in flight at a time.

def piece_of(p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """whole (a tensor of p's global shape) laid out as p is: p's own piece when p is a DTensor (cut here,
    no communication: every process has the whole), else whole itself, on p's device and in its dtype."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    whole = whole.to(p.device, p.dtype, copy=True)   # never the reader's own (a mapped file's) memory
    return distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None) \
        if isinstance(p, DTensor) else whole


def allocate(module: torch.nn.Module, device: str) -> None:
    """nn.Module.to_empty, keeping tied weights tied: memory on device for every meta parameter (its piece,
    for a DTensor) and buffer, each shared parameter given one new tensor for all the modules that hold it
    (to_empty gives each module its own, which would untie the embedding from the head)."""
    made = {}
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = torch.nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
                m._parameters[name] = made[id(p)]
        for name, b in m._buffers.items():
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty_like(b, device=device)


@torch.no_grad()
def materialise(module: torch.nn.Module, device: str, tp: int, value_of: Callable[[str, torch.Size], torch.Tensor]
                ) -> None:
    """Give a module built on the meta device (and laid out) memory on device, this process's pieces only, and
    fill each parameter with its piece of value_of(name, global shape), the whole tensor in one process's
    order (under tensor parallelism c_attn's rows are put in tensor_parallel's order first)."""
    allocate(module, device)
    init_buffers(module)
    for name, p in module.named_parameters():
        p.copy_(piece_of(p, permute_qkv_entry(name, value_of(name, p.shape), tp)))


def load_moments(named_parameters: list, optimizer: torch.optim.Optimizer, reader, tp: int,
                 aliases: dict[str, str] | None = None) -> None:
    """Give optimizer (AdamW over these parameters, laid out) the state that reader (checkpoints.TensorReader)
    holds for them, each parameter's piece of each moment, one tensor at a time, and the saved hyper-parameters.
    aliases: a local name -> the saved name whose state it shares (a pipeline's last-stage copy of wte)."""
    aliases, names = aliases or {}, {id(p): name for name, p in named_parameters}
    for group, saved in zip(optimizer.param_groups, reader.param_groups()):
        # The saved hyper-parameters; how this process computes the update (fused, foreach) stays its own.
        group.update({k: v for k, v in saved.items() if k not in ("params", "fused", "foreach", "capturable")})
        on_device = group.get("fused") or group.get("capturable")   # where AdamW keeps its step count
        for p in group["params"]:
            name = names[id(p)]
            saved_state = reader.moments(aliases.get(name, name))
            if saved_state is not None:
                optimizer.state[p] = {
                    key: v.to(p.device if on_device else "cpu", torch.float32, copy=True) if key == "step" else
                    piece_of(p, permute_qkv_entry(name, v, tp)) for key, v in saved_state.items()}


def state_pieces(named_parameters: list, optimizer: torch.optim.Optimizer, tp: int, part: int, parts: int
                 ) -> Iterator[tuple[str, list, int, torch.Tensor]]:
    """This process's share of a checkpoint, one tensor at a time: of every weight and AdamW moment it holds,
    whole or in pieces, the rows part/parts of the whole tensor in one process's order (a scalar: whole, on
    part 0), as (key, whole shape, first row, rows): key "model/NAME" or "optimizer/NAME/KEY". Each DTensor
    is all-gathered whole in turn (every process of its mesh runs this to the end, in the same order), cut,
    and freed once the next is asked for."""
    for name, p in named_parameters:
        for key, t in {"model/" + name: p.detach(),
                       **{f"optimizer/{name}/{k}": v for k, v in optimizer.state.get(p, {}).items()}}.items():
            whole = t.full_tensor() if hasattr(t, "full_tensor") else t
            whole = permute_qkv_entry(name, whole, tp, inverse=True).cpu()
            n = whole.shape[0] if whole.dim() else 1
            start, stop = n * part // parts, n * (part + 1) // parts
            if stop > start:
                yield key, list(whole.shape), start, whole[start:stop] if whole.dim() else whole


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
# same masks on the activations they replicate, which must stay equal. Where each process holds its own part
# of a tensor (its heads' attention weights; its slice of the sequence under sequence parallelism) one shared
# stream would drop the same entries of every part: head h and head h + H / tp would share a mask. There each
# process draws from a stream of its own (Megatron-LM's model-parallel generator, Shoeybi et al. 2019,
# section 3): RankStream below.

class RankStream:
    """Hooks that run the code between `enter` and `leave` on this tensor-parallel rank's own random stream.
    enter draws one number from the shared stream (every rank draws it, so the shared stream stays in step
    across the ranks) and seeds the generators with it plus the rank; leave puts the shared stream back as it
    was after the draw. Activation checkpointing replays the shared stream when it recomputes a block, so the
    recomputation draws the same number, hence the same masks. In eval mode (no dropout) it does nothing."""

    def __init__(self, tp_rank: int, device_type: str):
        self.tp_rank, self.cuda, self.shared = tp_rank, device_type == "cuda", None

    def enter(self, module: torch.nn.Module, args) -> None:
        if module.training:
            seed = int(torch.randint(2 ** 62, ()))          # from the shared (CPU) stream: the same on each rank
            self.shared = torch.get_rng_state(), torch.cuda.get_rng_state() if self.cuda else None
            torch.manual_seed(seed + self.tp_rank)           # CPU and CUDA generators

    def leave(self, *_) -> None:
        if self.shared is not None:
            torch.set_rng_state(self.shared[0])
            if self.cuda:
                torch.cuda.set_rng_state(self.shared[1])
            self.shared = None


def rank_streams_for_dropout(block: torch.nn.Module, tp_rank: int, device_type: str,
                             sequence_parallel: bool) -> None:
    """Give a block's dropouts on split tensors this rank's own stream (RankStream): attention's, on its heads'
    weights (from the attention's start to its output projection), and under sequence parallelism the
    residual branches' dropouts, on its slice of the sequence."""
    attn = RankStream(tp_rank, device_type)
    block.attn.register_forward_pre_hook(attn.enter)
    block.attn.c_proj.register_forward_pre_hook(attn.leave)
    if sequence_parallel:
        branches = [block.attn.resid_dropout] + [block.get_submodule(f"{mlp}.dropout") for mlp in ("mlp", "mlp_0")
                                                 if hasattr(block, mlp)]
        for dropout in branches:
            stream = RankStream(tp_rank, device_type)
            dropout.register_forward_pre_hook(stream.enter)
            dropout.register_forward_hook(stream.leave)


def permute_qkv(weight: torch.Tensor, tp: int, inverse: bool = False) -> torch.Tensor:
    """c_attn's rows (weight (3C, C) or bias (3C,)) reordered from [q; k; v] to [q_0; k_0; v_0; q_1; ...;
    v_{tp-1}], where q_r holds rows r C/tp .. (r+1) C/tp - 1 of q: the heads of tensor-parallel rank r. Then a
    plain split of the rows into tp equal blocks gives each rank its own heads' q, k and v, which it splits
    by thirds (model.CausalSelfAttention). inverse: the other way back. The identity when tp = 1."""
    blocks = (tp, 3) if inverse else (3, tp)          # (3, tp, C/tp, ...) -> (tp, 3, C/tp, ...), or back
    return weight.reshape(*blocks, -1, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape)


def permute_qkv_entry(name: str, t: torch.Tensor, tp: int, inverse: bool = False) -> torch.Tensor:
    """permute_qkv of t, a state-dict or optimizer-state entry of parameter `name`, when that is c_attn's
    weight or bias and t is not a scalar (AdamW's step count); t itself otherwise."""
    is_qkv = name.endswith(("attn.c_attn.weight", "attn.c_attn.bias"))
    return permute_qkv(t, tp, inverse) if is_qkv and t.dim() else t


def tp_loss_context(tp: int):
    """Where the loss is computed, forward and backward: under tensor parallelism (tp > 1), loss_parallel,
    whose cross-entropy takes the logits split by vocabulary (each process's log-sum-exp over its V / tp
    logits, one all-reduce to combine them); else nothing."""
    if tp == 1:
        return nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel
    return loss_parallel()


def tensor_parallel(model: torch.nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """Split `model` (a GPT or a GPTStage: blocks in .transformer.h, with wte, wpe, ln_f and lm_head where it
    holds them) in place across the processes of the 1-D mesh tp_mesh, Megatron-style (see above). Its
    weights must be the full model's, the same on every process, or on the meta device (then materialise
    makes each process's pieces); c_attn's rows are reordered first (permute_qkv), so checkpoints must undo
    that (state_pieces). With sequence_parallel, the LayerNorms and
    the residual stream between the blocks are split along T."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleOutput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)
    tp, tp_rank = tp_mesh.size(), tp_mesh.get_local_rank()
    # Between the blocks, the residual stream is replicated (B, T, C), or (B, T / tp, C) on each process
    # under sequence parallelism; the row-parallel projections that write into it sum their partial
    # outputs onto that layout (all-reduce, or reduce-scatter).
    stream = Shard(1) if sequence_parallel else Replicate()
    for block in model.transformer.h.children():   # a GPT's ModuleList, a GPTStage's ModuleDict
        attn = block.attn
        with torch.no_grad():
            for p in attn.c_attn.parameters():   # weight (3C, C), bias (3C,) when there is one
                p.copy_(permute_qkv(p, tp))
        attn.first_head = tp_rank * attn.n_head // tp
        if attn.dropout > 0:
            rank_streams_for_dropout(block, tp_rank, tp_mesh.device_type, sequence_parallel)
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
# With --fsdp, the D processes of a stage shard it instead (shard_stage); with --tp, each stage is split
# across tp processes, each in its own pipeline (build_pipeline).

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
    """What one process holds of the pipeline, and the steps of training through it. The processes form one
    (pp, dp, tp) device mesh: a pipeline runs along pp (one per (dp, tp) index), each stage is replicated
    (DDP-like) or sharded (FSDP) over dp, and each block's matmuls are split over tp."""
    module: torch.nn.ModuleList           # its GPTStage modules (one, or several when interleaved)
    stages: list                          # their torch.distributed.pipelining stages
    schedule: object                      # the torch.distributed.pipelining schedule
    holds_first: bool                     # runs stage 0: feeds the token ids
    holds_last: bool                      # runs the last stage: computes the loss
    mesh: object                          # the (pp, dp, tp) device mesh: this pipeline runs along its pp dim
    tie_group: object | None              # {first stage, last stage} of this pipeline, when wte is tied
    dp_rank: int                          # which data-parallel replica (or FSDP shard) this process belongs to
    dp_group: object | None               # the data-parallel replicas of these stages, when averaged here
    tp: int                               # processes each stage's matrices are split across
    fsdp: bool                            # the stages are sharded over dp
    accum: int                            # schedule steps (each of n_microbatches micro-batches) per update
    device: str                           # where this process's stages run

    def named_parameters(self) -> list:
        return [(name, p) for stage in self.module for name, p in stage.named_parameters()]

    def run(self, x: torch.Tensor, y: torch.Tensor, train: bool) -> torch.Tensor:
        """Run one batch through the pipeline (forward and backward when train) and return the sum of the
        micro-batch losses the schedule computed: non-zero on the last stage only. Call it outside autocast:
        the stages apply it to their forward passes (AutocastForward)."""
        losses = []
        run = self.schedule.step if train else self.schedule.eval
        with tp_loss_context(self.tp):
            run(*([x] if self.holds_first else []), target=y if self.holds_last else None, losses=losses)
        if not self.holds_last:
            return torch.zeros((), device=x.device)
        return local_value(torch.stack(losses).sum().detach())   # under loss_parallel, a replicated DTensor

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, micro_step: int, scaler: torch.amp.GradScaler,
                         weight: float) -> torch.Tensor:
        """Forward and backward of every micro-batch of the batch (x, y), the losses scaled by the schedule's
        loss function (scaled_cross_entropy), which was built for batches weighed alike: weight must be 1/accum.
        FSDP reduces the gradients on the last batch of the optimizer step only (AccumulatingStage). scaler
        plays no part: --pp refuses float16."""
        if weight != 1 / self.accum:
            raise ValueError(f"the pipeline weighs each batch 1/{self.accum}, not {weight}")
        for stage in self.stages:
            stage.reduce_grads = micro_step == self.accum - 1
        return self.run(x, y, train=True)

    def step_loss(self, loss: torch.Tensor) -> float:
        """The step's mean loss: only the last stages hold one, so the mean over all processes, times the
        stages, counts each replica once."""
        return (all_ranks_mean(loss) * self.mesh.size(0)).item()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float,
                       is_good: Callable[[torch.Tensor], bool]) -> torch.Tensor:
        """reduce_clip_and_step on this process's stages: the norm is the whole model's (all stages, shards and
        tensor-parallel slices, the tied matrix counted once: wte on the first stage, not lm_head on the last)."""
        tied = None if self.tie_group is None else \
            self.module[0].transformer.wte.weight if self.holds_first else self.module[-1].lm_head.weight
        return reduce_clip_and_step([p for _, p in self.named_parameters()], optimizer, grad_clip, is_good,
                                    self.mesh.size(1) * self.mesh.size(2), self.device, self.dp_group, self.tie_group,
                                    tied, count_tied=self.holds_first)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss, computed on the last stage and shared with the others."""
        loss = self.run(x, y, train=False) * self.accum       # undo the 1 / accum of the loss scale
        dist.all_reduce(loss, group=self.mesh.get_group("pp"))
        return loss

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, reader) -> None:
        """Load this process's pieces of AdamW's state from a checkpoint (checkpoints.TensorReader), a tensor at
        a time (load_moments); the last stage's copy of a tied wte takes wte's state."""
        aliases = {"lm_head.weight": "transformer.wte.weight"} if self.tie_group is not None else {}
        load_moments(self.named_parameters(), optimizer, reader, self.tp, aliases)
        if self.tp > 1 and not self.fsdp:   # as train.py set it: the saved groups say foreach
            use_single_tensor_adamw(optimizer)

    def state_pieces(self, optimizer: torch.optim.Optimizer) -> tuple[Iterator, list]:
        """This process's share of a checkpoint (state_pieces over the dp x tp processes of its stages; the
        last stage's copy of a tied wte is wte's, saved by the first) and its by-name parameter groups."""
        named = [(name, p) for name, p in self.named_parameters()
                 if not (self.tie_group is not None and self.holds_last and name == "lm_head.weight")]
        if self.fsdp:   # FSDP leaves the weights gathered after a forward: register the shards again
            for stage in self.stages:
                stage.submod.reshard()
        tp_rank = self.mesh.get_local_rank("tp")
        pieces = state_pieces(named, optimizer, self.tp, self.dp_rank * self.tp + tp_rank, self.mesh.size(1) * self.tp)
        groups = optimizer_state_by_name(self.named_parameters(), optimizer)["param_groups"]
        kept = {name for name, _ in named}
        return pieces, [dict(group, params=[n for n in group["params"] if n in kept]) for group in groups]


def shard_stage(stage: AutocastForward, dp_mesh) -> None:
    """FSDP2 on one pipeline stage over its dp group: each block a unit of its own, the rest (embeddings, ln_f,
    the head) the root's. Weights stay gathered from a micro-batch's forward to the step's end
    (reshard_after_forward=False, torchtitan's choice under pipelining): the pipelining stage keeps them
    gathered through backward anyway (PipelineStage.backward_maybe_with_nosync turns resharding after backward
    off until its last backward), so resharding after each forward would only gather them again for the next
    micro-batch. FSDP then saves the memory of the gradients and AdamW's moments between steps."""
    from torch.distributed.fsdp import fully_shard
    for block in stage.module.transformer.h.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=False)
    fully_shard(stage, mesh=dp_mesh, reshard_after_forward=False)


def build_pipeline(model_cfg: GPTConfig, value_of: Callable, mesh, device: str, dtype: torch.dtype, schedule: str,
                   balance: str, n_microbatches: int, virtual_stages: int, accum: int, fsdp: bool = False,
                   sequence_parallel: bool = False) -> Pipeline:
    """This process's stages of a (pp, dp, tp) device mesh, built on the meta device, each split across the tp
    processes when tp > 1 (tensor_parallel, with sequence_parallel), sharded over dp when fsdp, then given
    this process's pieces of the weights value_of(name, shape) (materialise); its forward under autocast to
    dtype, and, without fsdp, replicas averaging their gradients in
    Pipeline.optimizer_step), and the schedule that drives them, run `accum` times per optimizer step with
    n_microbatches micro-batches each (virtual_stages: stages per process, interleaved only). Call its
    schedule outside autocast.

    Under tensor parallelism every tp process of a stage runs the schedule, in its own pipeline (the pp dim of
    the mesh at its (dp, tp) index), and sends the next stage's matching process what its blocks output: the
    residual stream (B, T, C), whole on each, or its (B, T / tp, C) slice of it under sequence parallelism.
    The last stage's logits stay split by vocabulary, and the loss is computed from them under loss_parallel
    (tp_loss_context), as without the pipeline: the (B, T, V) logits are never gathered."""
    # Imported here, like FSDP: importing the pipelining package takes time that other layouts need not spend.
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    class AccumulatingStage(PipelineStage):
        """A PipelineStage whose FSDP gradients are reduced once per optimizer step. The schedule calls
        perform_reduce_grad at the end of every step() (it reduce-scatters and reshards); with accum step()
        calls per update, the gradients of the first accum - 1 stay gathered and add up, and the last call
        reduces their sum (Pipeline.forward_backward sets reduce_grads)."""
        reduce_grads = True

        def perform_reduce_grad(self, grad_scale_factor: int) -> None:
            if self.reduce_grads:
                super().perform_reduce_grad(grad_scale_factor)

    pp, dp, tp = mesh.size(0), mesh.size(1), mesh.size(2)
    pp_rank, dp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    n_virtual = virtual_stages if schedule == "interleaved_1f1b" else 1
    plan = plan_stages(model_cfg, pp * n_virtual, balance)
    if dist.get_rank() == 0:
        print("\n".join(describe_plan(model_cfg, plan, balance)))
    stage_ids = [pp_rank + v * pp for v in range(n_virtual)]      # interleaved: stages p, p+P, p+2P, ...
    with torch.device("meta"):
        modules = [GPTStage(model_cfg, plan[i], is_first=i == 0, is_last=i == len(plan) - 1) for i in stage_ids]
    wrapped = [AutocastForward(m, device, dtype) for m in modules]
    for stage in wrapped:
        if tp > 1:   # before FSDP, which then shards each process's tensor-parallel slices over dp
            tensor_parallel(stage.module, mesh["tp"], sequence_parallel)
        if fsdp:
            shard_stage(stage, mesh["dp"])
        materialise(stage.module, device, tp, value_of)
    stages = [AccumulatingStage(m, i, len(plan), torch.device(device), group=mesh.get_group("pp"))
              for m, i in zip(wrapped, stage_ids)]
    loss_fn = scaled_cross_entropy(1 / (n_microbatches * accum))
    # scale_grads=False: the loss is already scaled, and gradients accumulate over several step() calls.
    schedule_class = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
    pipeline_schedule = schedule_class[schedule](stages if schedule == "interleaved_1f1b" else stages[0],
                                                 n_microbatches, loss_fn, scale_grads=False)
    # Every process creates every group, in the same order (a rule of torch.distributed.new_group).
    tie_group = None
    if model_cfg.tie_embeddings:   # mesh.mesh: the global ranks, (pp, dp, tp)
        for first, last in zip(mesh.mesh[0].flatten().tolist(), mesh.mesh[-1].flatten().tolist()):
            group = dist.new_group([first, last])
            if dist.get_rank() in (first, last):
                tie_group = group
    return Pipeline(torch.nn.ModuleList(modules), stages, pipeline_schedule, holds_first=pp_rank == 0,
                    holds_last=pp_rank == pp - 1, mesh=mesh, tie_group=tie_group, dp_rank=dp_rank,
                    dp_group=mesh.get_group("dp") if dp > 1 and not fsdp else None, tp=tp, fsdp=fsdp, accum=accum,
                    device=device)

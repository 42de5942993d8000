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
from model import GPT, Block, GPTConfig, GPTStage, build_stage, describe_plan, plan_stages, stage_costs


# --- data parallelism: DDP and FSDP ---

class DataParallel:
    """The whole model on every process, each training on its share of every batch. `module` is the plain GPT:
    what the optimizer updates, evaluation runs and checkpoints save (its keys never carry `module.` or
    `_orig_mod.`); the training steps run through `wrapped`, which adds DDP and torch.compile when asked.

    DDP (Li et al. 2020): each process holds a full copy; backward averages the gradients across processes,
    so every copy takes the same step. FSDP (Zhao et al. 2023), in its second PyTorch version: each process
    stores 1/N of every tensor; a block's full weights are all-gathered just before it runs and freed after,
    and gradients are reduce-scattered, so each process updates only its shard."""

    def __init__(self, model: GPT, device: str, dtype: torch.dtype, local_rank: int, world_size: int,
                 fsdp: bool, compile: bool, accum: int, loss_chunk: int):
        self.module, self.device, self.dtype, self.fsdp = model.to(device), device, dtype, fsdp
        self.accum, self.loss_chunk = accum, loss_chunk
        if fsdp:
            # Imported here, when asked for: importing FSDP takes time that the other layouts need not spend.
            from torch.distributed.fsdp import fully_shard
            for block in model.transformer.h:
                fully_shard(block)
            fully_shard(model)             # the rest: embeddings, ln_f and the (tied) head
        wrapped = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None) \
            if world_size > 1 and not fsdp else model
        self.wrapped = torch.compile(wrapped) if compile else wrapped

    def named_parameters(self) -> list:
        return list(self.module.named_parameters())

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
                else nullcontext():
            with autocast(self.device, self.dtype):
                loss = self.wrapped(x, y, self.loss_chunk) / self.accum
            scaler.scale(loss).backward()
        return loss.detach()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float,
                       is_good: Callable[[torch.Tensor], bool]) -> torch.Tensor:
        """common.optimizer_step on the model: clip, step unless is_good(norm) says no, clear; the norm."""
        return optimizer_step(self.module, optimizer, scaler, grad_clip, is_good)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss, through the plain model (evaluation runs under no_grad: no DDP needed)."""
        return self.module(x, y, self.loss_chunk)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, saved: dict) -> None:
        """Load a by-name optimizer state from a checkpoint (FSDP: each process keeps its shards of it)."""
        if not self.fsdp:
            load_optimizer_state_by_name(self.named_parameters(), optimizer, saved)
        elif saved["state"]:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(self.module, optimizer, saved, options=StateDictOptions(full_state_dict=True))

    def full_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
        """The whole model's state dict and by-name optimizer state, on rank 0 (None elsewhere under FSDP, whose
        shards are gathered), so the checkpoint is the same file whatever the layout that wrote it."""
        if not self.fsdp:
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
        return (weights, optimizer_state) if dist.get_rank() == 0 else (None, None)


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
#
# A layout (pp, dp, tp) divides this three ways. Pipeline stages (pp) each hold a slice of the blocks.
# Tensor parallelism (tp, Shoeybi et al. 2019) splits each block's matmuls, and with them their weights,
# gradients, AdamW moments, 16-bit copies and most activations, by t; the LayerNorms stay whole on every
# rank. FSDP shards what a rank holds (its stage, its tensor-parallel slice) once more over the dp ranks.

GIB = 2 ** 30

# Memory of each GPU in common.PEAK_BF16_FLOPS, in GiB, for the variant named (the A100 also comes with 40 GB;
# the V100 16 GB is the card GPT-X trained on, there is a 32 GB one). train.py --dry_run warns when a plan
# needs more.
GPU_MEMORY_GIB = {"H100 PCIe": 80, "H100 NVL": 94, "H100": 80, "H200": 141, "A100": 80, "A10": 24, "L40S": 48,
                  "L4": 24, "V100": 16}

# Parameters that tensor parallelism splits (Shoeybi et al. 2019, section 3): the column-parallel c_attn and
# c_fc split their output features (weight rows and bias), so each rank computes whole heads and a slice of
# the MLP's 4C; the row-parallel c_proj splits its input features (the weight; its bias is added once, after
# the all-reduce, so every rank holds it whole); the token embedding and the LM head split the vocabulary.
# The LayerNorms, the position embedding and ReZero's scalars are replicated.
TENSOR_PARALLEL_SPLIT = ("c_attn.weight", "c_attn.bias", "c_fc.weight", "c_fc.bias", "c_proj.weight",
                         "wte.weight", "lm_head.weight")


def tensor_parallel_numel(name: str, numel: int, tp: int) -> int:
    """Elements of parameter `name` (numel in the whole model) on the fullest of tp tensor-parallel ranks:
    numel / tp, rounded up (a vocabulary that tp does not divide splits unevenly, as torch.chunk does), for
    the split ones; numel for the rest."""
    return -(-numel // tp) if name.endswith(TENSOR_PARALLEL_SPLIT) else numel


def count_params(module: torch.nn.Module, tp: int = 1) -> tuple[int, int]:
    """(parameters, parameters of nn.Linear weights: the ones autocast copies to 16 bits) on one of tp
    tensor-parallel ranks; a tied parameter counts once."""
    linear = sum(tensor_parallel_numel(f"{name}.weight", m.weight.numel(), tp)
                 for name, m in module.named_modules() if isinstance(m, torch.nn.Linear))
    return sum(tensor_parallel_numel(name, p.numel(), tp) for name, p in module.named_parameters()), linear


@dataclass
class ParamCounts:
    """Parameters of the GPT's parts on one tensor-parallel rank, each as (all, nn.Linear weights)."""
    block: tuple[int, int]                # one block
    embedding: tuple[int, int]            # wte (and wpe), on the first stage
    head: tuple[int, int]                 # ln_f and the LM head, on the last stage


def param_counts(config: GPTConfig, tp: int) -> ParamCounts:
    """ParamCounts of config's GPT under tp, counted on modules built on the meta device (shapes only)."""
    with torch.device("meta"):
        first = GPTStage(config, range(0), is_first=True, is_last=False)
        last = GPTStage(config, range(0), is_first=False, is_last=True)
        block = Block(config)
    return ParamCounts(count_params(block, tp), count_params(first, tp), count_params(last, tp))


def rank_params(config: GPTConfig, counts: ParamCounts, n_blocks: int, holds_first: bool,
                holds_last: bool) -> tuple[int, int]:
    """(parameters, Linear weights) one rank holds: n_blocks blocks, the embedding and/or the head. A rank that
    holds both ends holds the tied matrix once (the whole GPT); pipeline stages each hold a copy of it."""
    params = n_blocks * counts.block[0] + holds_first * counts.embedding[0] + holds_last * counts.head[0]
    if holds_first and holds_last and config.tie_embeddings:
        params -= counts.head[1]          # lm_head.weight is wte.weight
    return params, n_blocks * counts.block[1] + holds_last * counts.head[1]


def block_activation_bytes(config: GPTConfig, b: int, T: int, act_bytes: int, tp: int = 1,
                           sequence_parallel: bool = False) -> int:
    """Bytes one block saves for backward on a micro-batch of b sequences of T tokens, on one of tp
    tensor-parallel ranks. act_bytes: 2 under 16-bit autocast (matmul inputs and outputs), 4 in fp32; the
    residual stream and the LayerNorm inputs are fp32 either way. Counted per (b, T, C) tensor in Block's
    forward.

    Tensor parallelism (Korthikanti et al. 2022, section 4.2.2, Table 2) divides by t what lives inside the
    split: q, k, v, the attention output, the MLP's 4C-wide tensors and the (H, T, T) scores, since each rank
    holds H/t heads and 4C/t of the MLP. What lives outside it is whole on every rank: the LayerNorms' inputs
    and outputs (the outputs are the inputs of c_attn and c_fc) and ReZero's branch outputs: Megatron's
    sbh(10 + 24/t + 5as/(ht)). Sequence parallelism splits the LayerNorms, dropout and the residual stream by
    sequence, so their tensors divide by t too; the inputs of c_attn and c_fc do not: PyTorch's
    ColwiseParallel all-gathers them before the matmul, and autograd keeps the gathered (b, T, C) tensor for
    the weight gradient (Megatron keeps the 1/t slice and gathers it again in backward, reaching sbh/t (34 +
    5as/h), section 4.2.2)."""
    C, H, a, t = config.n_embd, config.n_head, act_bytes, tp
    btc = b * T * C
    outside = t if sequence_parallel else 1             # what sequence parallelism splits, and plain TP does not
    gathered = a * btc                                   # the input of a column-parallel matmul (c_attn, c_fc)
    mlp = gathered + 8 * a * btc // t                   # c_fc input (C); GELU input, c_proj input (4C each)
    norms = 0 if config.rezero else 4 * btc // outside  # each LayerNorm saves its fp32 input
    rezero = a * btc // outside if config.rezero else 0  # alpha * branch saves the branch (after c_proj)
    total = 2 * norms + 2 * rezero + gathered + a * btc // t + 3 * a * btc // t + mlp   # c_proj input; q, k, v
    if config.sparse_topk or config.realformer or not config.sdpa:   # the explicit path keeps the T x T weights
        # the fp32 softmax, its 16-bit copy, the top-k mask: H/t heads each
        total += b * H * T * T * (4 + (a if a < 4 else 0) + (1 if config.sparse_topk else 0)) // t
    else:                                              # SDPA's output; ALiBi's float mask, H/t heads
        total += (a * btc + (a * H * T * T if config.position == "alibi" else 0)) // t
    if config.position == "rope":
        total += 2 * a * btc // t                       # the rotated q and k
    if config.macaron:
        total += norms + rezero + mlp                   # the second feed-forward
    return total


def head_activation_bytes(config: GPTConfig, b: int, T: int, act_bytes: int, loss_chunk: int, tp: int = 1,
                          sequence_parallel: bool = False) -> int:
    """Bytes the final LayerNorm, the LM head and the loss hold at their peak, early in backward. The plain path
    keeps the fp32 log-probabilities (B, T, V), and log_softmax's backward holds them, their gradient and the
    logits' gradient at once (12 bytes per logit); the chunked one keeps d loss / d x and a (V, C) fp32 weight
    gradient, and two (chunk, V) fp32 buffers at a time. Under tensor parallelism the head is vocabulary-
    parallel (Shoeybi et al. 2019, section 3): every (.., V) tensor divides by t; ln_f's input divides by t
    with sequence parallelism, and the head's gathered input does not."""
    C, V, a, t = config.n_embd, config.vocab_size, act_bytes, tp
    btc, btv = b * T * C, b * T * (-(-V // t))
    ln_input = 4 * btc // (t if sequence_parallel else 1)
    if loss_chunk > 0:
        return ln_input + 4 * btc + 4 * (-(-V // t)) * C + 2 * 4 * loss_chunk * (-(-V // t))
    return ln_input + a * btc + 12 * btv


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


def memory_estimate(config: GPTConfig, counts: ParamCounts, n_blocks: int, n_chunks: int, holds_first: bool,
                    holds_last: bool, micro_batch: int, in_flight: int, head_in_flight: int, act_bytes: int,
                    loss_chunk: int, shards: int, data_parallel: bool, tp: int = 1,
                    sequence_parallel: bool = False) -> dict[str, float]:
    """Estimated peak bytes on one GPU, by kind, for what one rank holds: n_blocks blocks in n_chunks
    virtual-stage chunks (1 unless interleaved), each chunk keeping the activations of in_flight
    micro-batches of micro_batch sequences (the head's: head_in_flight), the embedding and/or the head, all
    on one of tp tensor-parallel ranks (counts: ParamCounts under tp). shards > 1: FSDP splits weights,
    gradients and AdamW states over the dp ranks, and gathers two blocks at a time (the current and the
    prefetched next; under TP each gathers its 1/t slice). data_parallel: DDP keeps its gradient buckets
    beside .grad (under --pp, the flat copy the replicas average)."""
    T = config.block_size
    params, linear = rank_params(config, counts, n_blocks, holds_first, holds_last)
    block_params, block_linear = counts.block
    estimate = {"weights": 4 * params / shards + (2 * 4 * block_params if shards > 1 else 0),
                "gradients": 4 * params / shards * (2 if data_parallel and shards == 1 else 1),
                "AdamW": 8 * params / shards}
    per_block = block_activation_bytes(config, micro_batch, T, act_bytes, tp, sequence_parallel)
    if config.activation_checkpointing:
        # Each block keeps its fp32 input (split by sequence under sequence parallelism; Korthikanti et al.
        # 2022, section 5: 2sbhL/t); one block is rebuilt at a time, and only its 16-bit weight copies live.
        kept = 4 * micro_batch * T * config.n_embd // (tp if sequence_parallel else 1)
        activations = n_blocks // n_chunks * kept * in_flight + per_block
        copies = linear - (n_blocks - 1) * block_linear if n_blocks else linear
    else:
        activations, copies = n_blocks // n_chunks * per_block * in_flight, linear
    if holds_last:
        activations += head_activation_bytes(config, micro_batch, T, act_bytes, loss_chunk, tp,
                                             sequence_parallel) * head_in_flight
    estimate["16-bit weight copies"] = 2 * copies if act_bytes == 2 else 0
    estimate["activations"] = activations
    return estimate


@dataclass
class Layout:
    """How a run spreads over pp x dp x tp GPUs, and what each micro-batch is: the dry run's input."""
    pp: int = 1                           # pipeline stages
    dp: int = 1                           # data-parallel replicas (FSDP shards when fsdp)
    tp: int = 1                           # tensor-parallel ranks
    fsdp: bool = False
    sequence_parallel: bool = False
    schedule: str = "1f1b"                # the pipeline schedule (pp > 1)
    n_microbatches: int = 1               # micro-batches per pipeline flush (pp > 1)
    virtual_stages: int = 1               # stages per rank (interleaved 1F1B)
    balance: str = "flops"                # the splitter's cost model (pp > 1)
    micro_batch: int = 1                  # sequences per micro-batch
    act_bytes: int = 2                    # 2: 16-bit autocast; 4: fp32
    loss_chunk: int = 0                   # 0: the plain loss; else ChunkedCrossEntropy's rows per chunk

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp


def plan_memory(config: GPTConfig, layout: Layout, plans: dict | None = None
                ) -> list[tuple[str, int, dict[str, float]]]:
    """(name, parameters, memory_estimate) for each pipeline rank of the layout (one row when pp == 1): what
    one GPU of that rank holds. Stages come from model.plan_stages, as the real run cuts them (plans: a dict
    that keeps the cuts for the next call, for a search that plans many layouts of one model)."""
    counts, L = param_counts(config, layout.tp), layout
    shards = L.dp if L.fsdp else 1
    replicated = L.dp > 1 and not L.fsdp
    if L.pp == 1:
        params = rank_params(config, counts, config.n_layer, True, True)[0]
        return [("each GPU", params, memory_estimate(
            config, counts, config.n_layer, 1, True, True, L.micro_batch, 1, 1, L.act_bytes, L.loss_chunk, shards,
            replicated, L.tp, L.sequence_parallel))]
    n_virtual = L.virtual_stages if L.schedule == "interleaved_1f1b" else 1
    key = (L.pp * n_virtual, L.balance, config.vocab_size)
    plans = {} if plans is None else plans
    if key not in plans:
        plans[key] = plan_stages(config, L.pp * n_virtual, L.balance)
    plan, rows = plans[key], []
    for rank in range(L.pp):
        ids = [rank + v * L.pp for v in range(n_virtual)]     # interleaved: stages p, p + P, p + 2P, ...
        n_blocks = sum(len(plan[i]) for i in ids)
        holds_first, holds_last = 0 in ids, len(plan) - 1 in ids
        in_flight = microbatches_in_flight(L.schedule, L.pp, L.n_microbatches, L.virtual_stages, rank)
        estimate = memory_estimate(config, counts, n_blocks, n_virtual, holds_first, holds_last, L.micro_batch,
                                   in_flight, in_flight if L.schedule == "gpipe" else 1, L.act_bytes, L.loss_chunk,
                                   shards, replicated, L.tp, L.sequence_parallel)
        blocks = ", ".join(f"{plan[i].start}-{plan[i].stop - 1}" if plan[i] else "none" for i in ids)
        rows.append((f"stage {rank} (blocks {blocks})",
                     rank_params(config, counts, n_blocks, holds_first, holds_last)[0], estimate))
    return rows


def step_seconds(config: GPTConfig, flops_per_step: float, layout: Layout, peak: float,
                 mfu: float) -> dict[str, float]:
    """Seconds per optimizer step, by part, for flops_per_step model FLOPs (6N + attention per token) on
    layout.world_size GPUs of peak FLOP/s each, computing at mfu of their peak while they compute:
      compute:   the model FLOPs;
      recompute: activation checkpointing runs each block's forward again, 1/3 of the blocks' FLOPs
                 (forward 2 of the 6 per parameter) (Chen et al. 2016; Korthikanti et al. 2022, section 5);
      bubble:    a pipeline flush leaves each stage idle (p - 1)/m of the ideal time with GPipe and 1F1B, and
                 (p - 1)/(v m) with v interleaved stages per rank (Narayanan et al. 2021, section 2.2).
    Not modeled: tensor-parallel and data-parallel communication (all-reduces, FSDP's all-gathers), which
    the layouts here keep within a node (tp <= 8) or overlap with backward; mfu absorbs what is not hidden."""
    compute = flops_per_step / (layout.world_size * peak * mfu)
    block, _, head = stage_costs(config, "flops")
    blocks_share = config.n_layer * block / (config.n_layer * block + head)
    recompute = compute * blocks_share / 3 if config.activation_checkpointing else 0.0
    bubble = 0.0
    if layout.pp > 1:
        v = layout.virtual_stages if layout.schedule == "interleaved_1f1b" else 1
        bubble = (compute + recompute) * (layout.pp - 1) / (v * layout.n_microbatches)
    return {"compute": compute, "recompute": recompute, "bubble": bubble}

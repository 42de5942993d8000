"""The planner: which layouts a run can take and what each costs, before it starts.

The checks of a run's flags and layout (the run stops on their first refusal; the layout search asks the same
ones of every layout it tries), the memory model (what one GPU holds under a layout: weights, gradients, AdamW,
16-bit copies, activations) and the time model, and the dry run (`train.py --dry_run`), which prints the plan
and, when it does not fit, searches for a layout that does. Everything here is arithmetic on shapes: the
model is built on the meta device, and no process group, data file or GPU is touched.
"""
import collections
import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model import Block, GPTConfig, GPTStage, arg, flops_per_token, plan_stages, stage_costs
from processes import GPU_COMPUTE_CAPABILITY, PEAK_BF16_FLOPS, auto_dtype, dtype_name


# --- the layout's flags ---

@dataclass
class LayoutConfig:
    """How a run lays its processes out (under torchrun: world size = pp x data-parallel replicas x tp), and the
    dry run that plans a layout without running it. train.py's TrainConfig extends it."""
    fsdp: bool = arg(False, "under torchrun, shard weights, gradients and AdamW state across the processes "
                            "(FSDP2) instead of giving each a full copy (DDP)")
    # pipeline parallelism
    pp: int = arg(1, "pipeline stages: each process runs a contiguous slice of the blocks")
    pp_schedule: str = arg("1f1b", "order of the micro-batches' forward and backward passes",
                           choices=("gpipe", "1f1b", "interleaved_1f1b"))
    pp_balance: str = arg("flops", "cost model the splitter balances the stages by",
                          choices=("flops", "params", "uniform"))
    n_microbatches: int | None = arg(None, "micro-batches each batch_size batch is cut into under --pp (default: "
                                           "the fewest that give every stage work: >= --pp and dividing "
                                           "--batch_size; more shrink the bubble and, under 1F1B, the activations "
                                           "in flight)")
    pp_virtual_stages: int = arg(2, "stages per process with --pp_schedule=interleaved_1f1b")
    # tensor parallelism
    tp: int = arg(1, "tensor-parallel processes: each block's matrices, the embedding and the LM head split "
                     "across them, attention by heads (Megatron-LM); keep them within a node. The loss is "
                     "computed from the vocabulary-split logits (--loss_chunk does not apply)")
    sequence_parallel: bool = arg(False, "with --tp, also split the LayerNorms, dropout and residual stream along "
                                         "the sequence (Korthikanti et al. 2022): less activation memory")
    # the dry run: plan a run without running it
    dry_run: bool = arg(False, "build the model on the meta device, print parameters, FLOPs per token, tokens "
                               "per step, memory per GPU and time per step, then exit (no data, no files, no "
                               "torchrun)")
    dry_run_gpu: str = arg("H100", "GPU the dry run plans for (peak FLOP/s and memory from processes.py and "
                                   "planner.py)", choices=tuple(PEAK_BF16_FLOPS))
    dry_run_mfu: float = arg(0.4, "model FLOPs utilisation the dry run assumes while the GPUs compute (the "
                                  "pipeline bubble and recomputation come on top)")
    dry_run_world_size: int | None = arg(None, "GPUs (processes) the dry run plans for (default: --pp x --tp, "
                                               "one data-parallel replica)")


# --- the layouts a run can take: its checks ---

# Each check below is a generator of refusals, one line each, most basic first: a check runs only once those
# before it passed, and whoever asks takes the first. A run stops on it (train.py's check_config and
# check_layout); find_layout asks them of every layout it considers, so it never suggests flags a run refuses.
def config_refusals(cfg, model_cfg: GPTConfig) -> Iterator[str]:
    """Why these flags cannot run, whatever the number of processes."""
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if getattr(model_cfg, name) < 1:
            yield f"--{name}={getattr(model_cfg, name)} must be >= 1"
    if model_cfg.n_embd % model_cfg.n_head:
        yield f"--n_embd={model_cfg.n_embd} must be divisible by --n_head={model_cfg.n_head}"
    if not 0 <= model_cfg.dropout < 1:
        yield f"--dropout={model_cfg.dropout} must be in [0, 1)"
    if cfg.resume_from and cfg.init_from != "resume":
        yield f"--resume_from={cfg.resume_from} needs --init_from=resume"
    if model_cfg.sparse_topk < 0:
        yield f"--sparse_topk={model_cfg.sparse_topk} must be >= 0 (0 keeps every score)"
    if model_cfg.realformer and cfg.pp > 1:
        yield ("--realformer passes attention scores from block to block, which pipeline stages do not carry; "
               "drop --pp or --realformer")
    yield from tensor_parallel_refusals(cfg, model_cfg)
    if cfg.fsdp and cfg.pp > 1 and cfg.gradient_accumulation_steps > 1 and not cfg.dry_run:
        # Pipeline.forward_backward reduces FSDP's gradients once per optimizer step through the pipelining
        # stage's perform_reduce_grad; a torch whose stage lacks it would reduce them after every accumulated
        # batch, so refuse rather than train on wrong gradients.
        from torch.distributed.pipelining import PipelineStage
        if not hasattr(PipelineStage, "perform_reduce_grad"):
            yield (f"--fsdp with --pp and --gradient_accumulation_steps > 1 needs a newer torch than "
                   f"{torch.__version__}; upgrade torch, or use --gradient_accumulation_steps=1 with more "
                   f"--n_microbatches")
    if cfg.pp > 1:
        yield from pipeline_refusals(cfg, model_cfg)


def tensor_parallel_refusals(cfg, model_cfg: GPTConfig) -> Iterator[str]:
    """Why --tp and --sequence_parallel cannot split this model."""
    tp = cfg.tp
    if tp < 1:
        yield f"--tp={tp} must be >= 1"
    if cfg.sequence_parallel and tp == 1:
        yield "--sequence_parallel splits the sequence across tensor-parallel processes: add --tp=N"
    if tp <= 1:
        return
    # Attention splits by whole heads; then tp also divides C = H D and the MLP's 4C hidden units.
    if model_cfg.n_head % tp:
        yield f"--tp={tp} must divide --n_head ({model_cfg.n_head}): attention splits by whole heads"
    if cfg.loss_chunk:
        yield (f"--loss_chunk={cfg.loss_chunk} does not apply under --tp, which computes the loss from the "
               f"vocabulary-split logits; drop --loss_chunk")
    if cfg.compile:
        yield "--compile is not supported with --tp yet; drop one of them"
    if cfg.sequence_parallel and model_cfg.rezero:
        yield ("--sequence_parallel with --rezero is not supported (each process would see its slice of the "
               "sequence in ReZero's scalars' gradients); drop one of them")
    if cfg.sequence_parallel and model_cfg.block_size % tp:
        yield f"--sequence_parallel needs --tp={tp} to divide --block_size={model_cfg.block_size}"


def pipeline_refusals(cfg, model_cfg: GPTConfig) -> Iterator[str]:
    """Why --pp cannot cut this model and its batches into stages and micro-batches."""
    n_stages = cfg.pp * (cfg.pp_virtual_stages if cfg.pp_schedule == "interleaved_1f1b" else 1)
    if n_stages > model_cfg.n_layer:
        yield (f"{n_stages} pipeline stages need at least as many blocks, but --n_layer={model_cfg.n_layer}; "
               f"lower --pp (or --pp_virtual_stages)")
    # Each refusal names a value that works: the default's choice, or the smallest batch that has one.
    choices = microbatch_choices(cfg.batch_size, cfg.pp, cfg.pp_schedule)
    works = f"--n_microbatches={choices[0]} works" if choices else \
        f"--batch_size={-(-cfg.batch_size // cfg.pp) * cfg.pp} --n_microbatches={cfg.pp} works"
    n = cfg.n_microbatches
    if n is None and not choices:
        multiple = " and a multiple of it" if cfg.pp_schedule == "interleaved_1f1b" else ""
        yield (f"--pp={cfg.pp} with {cfg.pp_schedule} needs a number of micro-batches that is at least "
               f"{cfg.pp}{multiple} and divides --batch_size={cfg.batch_size}; {works}")
    if n is not None and (n < 1 or cfg.batch_size % n):
        yield f"--n_microbatches={n} must divide --batch_size={cfg.batch_size}; {works}"
    if n is not None and cfg.pp_schedule != "gpipe" and n < cfg.pp:
        yield f"--pp_schedule={cfg.pp_schedule} needs --n_microbatches >= --pp={cfg.pp}; {works}"
    if n is not None and cfg.pp_schedule == "interleaved_1f1b" and n % cfg.pp:
        yield f"interleaved_1f1b needs --n_microbatches a multiple of --pp={cfg.pp}; {works}"
    if cfg.compile:
        yield "--compile is not supported with --pp yet; drop one of them"


def dry_run_refusals(cfg) -> Iterator[str]:
    """Why the dry run's own flags cannot plan."""
    world_size, model_parallel = cfg.dry_run_world_size or cfg.pp * cfg.tp, cfg.pp * cfg.tp
    if not 0 < cfg.dry_run_mfu <= 1:
        yield f"--dry_run_mfu={cfg.dry_run_mfu} must be in (0, 1]"
    if world_size < 1 or world_size % model_parallel:
        works = max(1, -(-world_size // model_parallel)) * model_parallel
        yield (f"--dry_run_world_size={world_size} must be a positive multiple of --pp x --tp = {model_parallel}; "
               f"--dry_run_world_size={works} works")
    if cfg.fsdp and world_size == model_parallel:
        yield (f"--dry_run with --fsdp shards over data-parallel ranks, so it needs more GPUs than --pp x --tp = "
               f"{model_parallel}; --dry_run_world_size={2 * model_parallel} works")
    yield from layout_refusals(cfg, world_size, planned_dtype(cfg))   # what the planned run itself would refuse


def layout_refusals(cfg, world_size: int, dtype: str) -> Iterator[str]:
    """Why these flags cannot run on world_size processes computing in dtype, the dtype --dtype resolved to:
    --dtype=auto is float16 on a GPU without native bf16, so the float16 refusals look at the resolved one."""
    if cfg.tp > 1 and world_size % (cfg.pp * cfg.tp):
        size = cfg.pp * cfg.tp
        layout = f"--pp={cfg.pp} x --tp={cfg.tp}" if cfg.pp > 1 else f"--tp={cfg.tp}"
        yield (f"{layout} needs a multiple of {size} processes, not {world_size}: "
               f"torchrun --nproc-per-node={size} train.py ... works")
    if cfg.pp > 1 and world_size == 1:
        yield f"--pp={cfg.pp} needs one process per stage: torchrun --nproc-per-node={cfg.pp} train.py ..."
    if world_size % cfg.pp:
        yield f"--pp={cfg.pp} must divide the number of processes ({world_size})"
    if cfg.fsdp and world_size == 1:
        yield "--fsdp shards across processes: torchrun --nproc-per-node=N train.py --fsdp"
    if cfg.fsdp and cfg.pp > 1 and world_size == cfg.pp * cfg.tp:
        yield (f"--fsdp shards each pipeline stage across its data-parallel processes, but {world_size} processes "
               f"for --pp={cfg.pp} leave one per stage; launch a multiple of {2 * cfg.pp * cfg.tp} processes")
    # float16 needs loss scaling, and these layouts do not unscale sharded or staged gradients before the
    # clip (the GradScaler's unscale_ and inf check assume whole local gradients): refuse rather than clip
    # against a norm 65,536 times too large, or train a pipeline without scaling at all.
    layouts = [flag for flag, on in (("--tp", cfg.tp > 1), ("--pp", cfg.pp > 1), ("--fsdp", cfg.fsdp)) if on]
    if dtype == "float16" and layouts and cfg.dtype == "auto":
        yield (f"--dtype=auto chose float16 (this GPU has no native bf16), which needs a gradient scaler that "
               f"{layouts[0]} does not support here; use --dtype=float32 (bfloat16 is emulated, slower, here)")
    elif dtype == "float16" and layouts:
        yield (f"--dtype=float16 needs a gradient scaler, which {layouts[0]} does not support here; use "
               f"--dtype=bfloat16 or float32")


def microbatch_choices(batch_size: int, pp: int, schedule: str) -> list[int]:
    """Micro-batch counts, smallest first, that cut a batch of batch_size sequences evenly and give each of pp
    pipeline stages work when the pipe is full: at least pp (1F1B needs one micro-batch per stage to fill the
    pipe; with fewer, GPipe keeps some stage idle at every moment), and multiples of pp under interleaved 1F1B,
    whose schedule runs the micro-batches in groups of pp (Narayanan et al. 2021, section 2.2.2)."""
    return [n for n in range(pp, batch_size + 1)
            if batch_size % n == 0 and (schedule != "interleaved_1f1b" or n % pp == 0)]


def microbatches(cfg) -> int:
    """Micro-batches per batch under --pp: --n_microbatches, or by default the fewest that work
    (microbatch_choices), which follows --pp. No choice at all (batch_size < pp): pp, which check_config
    refuses with a batch size that works."""
    return cfg.n_microbatches if cfg.n_microbatches is not None else \
        next(iter(microbatch_choices(cfg.batch_size, cfg.pp, cfg.pp_schedule)), cfg.pp)


# --- the memory model: what one GPU holds ---
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

# Memory of each GPU in processes.PEAK_BF16_FLOPS, in GiB, for the variant named (the A100 also comes with 40 GB;
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
    """ParamCounts of config's GPT under tp, counted on modules built on the meta device (shapes only).
    RealFormer adds no parameters (it hands scores between blocks), and a GPTStage cannot carry it: the stages
    are built without it."""
    config = dataclasses.replace(config, realformer=False)
    with torch.device("meta"):   # a block; the first stage's embedding; the last stage's head
        parts = (Block(config), GPTStage(config, range(0), is_first=True, is_last=False),
                 GPTStage(config, range(0), is_first=False, is_last=True))
    return ParamCounts(*(count_params(part, tp) for part in parts))


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
    gradient, and per chunk of rows its fp32 logits (the softmax and its gradient overwrite them in place)
    and, under 16-bit autocast, a 16-bit copy: the matmul output they are cast from, then (bf16) the gradient
    cast for the two gradient matmuls (fp16 keeps it in fp32: counted all the same). A chunk's buffers are
    made while the last chunk's are still held (the names are rebound only once the new ones exist): two
    chunks' worth, or one when the b T rows make a single chunk, of b T rows then, not loss_chunk. Under
    tensor parallelism the head is vocabulary-parallel (Shoeybi et al. 2019, section 3): every (.., V) tensor
    divides by t; ln_f's input divides by t with sequence parallelism, and the head's gathered input does
    not."""
    C, a, t = config.n_embd, act_bytes, tp
    vt = -(-config.vocab_size // t)                      # V / t: the vocabulary on one rank, rounded up
    btc, btv = b * T * C, b * T * vt
    ln_input = 4 * btc // (t if sequence_parallel else 1)
    if loss_chunk > 0:
        rows, chunks_held = min(loss_chunk, b * T), 2 if b * T > loss_chunk else 1
        per_logit = 4 + (a if a < 4 else 0)            # fp32 logits, and the 16-bit copies under autocast
        return ln_input + 4 * btc + 4 * vt * C + chunks_held * per_logit * rows * vt
    return ln_input + a * btc + 12 * btv


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

    @property
    def chunks(self) -> int:
        """Stages per pipeline rank: virtual_stages under interleaved 1F1B, else 1."""
        return self.virtual_stages if self.pp > 1 and self.schedule == "interleaved_1f1b" else 1


def microbatches_in_flight(layout: Layout, pp_rank: int) -> int:
    """Micro-batches whose activations pipeline rank pp_rank of the layout's P holds at once (in virtual-stage
    chunks when interleaved): GPipe runs every forward first; 1F1B (Narayanan et al. 2019) starts backward
    after P - p forwards; interleaved 1F1B warms up with 2(P - p - 1) + (V - 1)P chunks (Narayanan et al. 2021)."""
    P, n, V = layout.pp, layout.n_microbatches, layout.virtual_stages
    if layout.schedule == "gpipe":
        return n
    if layout.schedule == "1f1b":
        return min(n, P - pp_rank)
    return min(n * V, 2 * (P - pp_rank - 1) + (V - 1) * P + 1)


def memory_estimate(config: GPTConfig, counts: ParamCounts, layout: Layout, n_blocks: int, holds_first: bool,
                    holds_last: bool, in_flight: int) -> dict[str, float]:
    """Estimated peak bytes on one GPU of the layout, by kind, for what one rank holds: n_blocks blocks in
    layout.chunks virtual-stage chunks, each chunk keeping the activations of in_flight micro-batches (the
    head's too under GPipe, else one), the embedding and/or the head, all on one of layout.tp tensor-parallel
    ranks (counts: ParamCounts under tp). Under FSDP the weights, gradients and AdamW states are split over the
    dp ranks, and two blocks are gathered at a time (the current and the prefetched next; under TP each
    gathers its 1/t slice), except in a pipeline, where the stage's weights stay gathered through the step
    and its gradients whole until the step's one reduce-scatter (shard_stage). Under DDP the gradient buckets
    sit beside .grad (under --pp, the flat copy the replicas average)."""
    T, L, pipelined = config.block_size, layout, layout.pp > 1
    shards, data_parallel = L.dp if L.fsdp else 1, L.dp > 1 and not L.fsdp
    params, linear = rank_params(config, counts, n_blocks, holds_first, holds_last)
    block_params, block_linear = counts.block
    gathered = 0 if shards == 1 else 4 * params if pipelined else 2 * 4 * block_params
    estimate = {"weights": 4 * params / shards + gathered,
                "gradients": 4 * params / shards * (2 if data_parallel and shards == 1 else 1)
                + (4 * params if shards > 1 and pipelined else 0),
                "AdamW": 8 * params / shards}
    per_block = block_activation_bytes(config, L.micro_batch, T, L.act_bytes, L.tp, L.sequence_parallel)
    if config.activation_checkpointing:
        # Each block keeps its fp32 input (split by sequence under sequence parallelism; Korthikanti et al.
        # 2022, section 5: 2sbhL/t); one block is rebuilt at a time, and only its 16-bit weight copies live.
        kept = 4 * L.micro_batch * T * config.n_embd // (L.tp if L.sequence_parallel else 1)
        activations = n_blocks // L.chunks * kept * in_flight + per_block
        copies = linear - (n_blocks - 1) * block_linear if n_blocks else linear
    else:
        activations, copies = n_blocks // L.chunks * per_block * in_flight, linear
    if holds_last:
        activations += head_activation_bytes(config, L.micro_batch, T, L.act_bytes, L.loss_chunk, L.tp,
                                             L.sequence_parallel) * (in_flight if L.schedule == "gpipe" else 1)
    estimate["16-bit weight copies"] = 2 * copies if L.act_bytes == 2 else 0
    estimate["activations"] = activations
    return estimate


def plan_memory(config: GPTConfig, layout: Layout, plans: dict | None = None
                ) -> list[tuple[str, int, dict[str, float]]]:
    """(name, parameters, memory_estimate) for each pipeline rank of the layout (one row when pp == 1): what
    one GPU of that rank holds. Stages come from model.plan_stages, as the real run cuts them (plans: a dict
    that keeps the cuts for the next call, for a search that plans many layouts of one model)."""
    counts, L, pipelined = param_counts(config, layout.tp), layout, layout.pp > 1
    key, plans = (L.pp * L.chunks, L.balance, config.vocab_size), {} if plans is None else plans
    if key not in plans:
        plans[key] = plan_stages(config, L.pp * L.chunks, L.balance) if pipelined else [range(config.n_layer)]
    plan, rows = plans[key], []
    for rank in range(L.pp):
        ids = [rank + v * L.pp for v in range(L.chunks)]     # interleaved: stages p, p + P, p + 2P, ...
        n_blocks = sum(len(plan[i]) for i in ids)
        holds_first, holds_last = 0 in ids, len(plan) - 1 in ids
        in_flight = microbatches_in_flight(L, rank) if pipelined else 1
        estimate = memory_estimate(config, counts, L, n_blocks, holds_first, holds_last, in_flight)
        blocks = ", ".join(f"{plan[i].start}-{plan[i].stop - 1}" if plan[i] else "none" for i in ids)
        rows.append((f"stage {rank} (blocks {blocks})" if pipelined else "each GPU",
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
    bubble = (compute + recompute) * (layout.pp - 1) / (layout.chunks * layout.n_microbatches)   # 0 for pp = 1
    return {"compute": compute, "recompute": recompute, "bubble": bubble}


# --- the dry run: plan a run before it starts ---

def planned_dtype(cfg) -> str:
    """The dtype a run with these flags computes in on the dry run's GPU: --dtype=auto resolved as the run
    would resolve it there (processes.auto_dtype of the GPU's compute capability)."""
    return cfg.dtype if cfg.dtype != "auto" else dtype_name(auto_dtype(GPU_COMPUTE_CAPABILITY[cfg.dry_run_gpu]))


def dry_run_layout(cfg, world_size: int) -> Layout:
    """The Layout a run with these flags takes on world_size GPUs."""
    m = microbatches(cfg) if cfg.pp > 1 else 1
    return Layout(pp=cfg.pp, dp=world_size // (cfg.pp * cfg.tp), tp=cfg.tp, fsdp=cfg.fsdp,
                  sequence_parallel=cfg.sequence_parallel and cfg.tp > 1, schedule=cfg.pp_schedule, n_microbatches=m,
                  virtual_stages=cfg.pp_virtual_stages, balance=cfg.pp_balance, micro_batch=cfg.batch_size // m,
                  act_bytes=4 if planned_dtype(cfg) == "float32" else 2, loss_chunk=cfg.loss_chunk or 0)   # CUDA's


def describe_layout(layout: Layout) -> str:
    """'pp=P (schedule, m micro-batches) x dp=D x tp=T': the three dims of the device mesh; fsdp=D when the
    data-parallel ranks shard the weights."""
    schedule = f" ({layout.schedule}, {layout.n_microbatches} micro-batches)" if layout.pp > 1 else ""
    return (f"pp={layout.pp}{schedule} x {'fsdp' if layout.fsdp else 'dp'}={layout.dp} x tp={layout.tp}"
            + (" (sequence parallel)" if layout.sequence_parallel else ""))


FIT_FRACTION = 0.9       # of each GPU the search fills: the rest for what the memory model does not count
TP_SIZES = (1, 2, 4, 8)                    # tensor parallelism stays within a node of 8 GPUs (NVLink)


def find_layout(cfg, model_cfg: GPTConfig, world_size: int, memory_gib: float
                ) -> tuple[tuple[list[str], Layout, float] | None, tuple[list[str], str] | None]:
    """(found, refused). found: a layout of world_size GPUs that train.py accepts and whose plan fits
    FIT_FRACTION of memory_gib on every GPU, as the flags that give it (to add to the command), the Layout and
    its largest GPU's GiB; None if none of the grid does. refused: when nothing is found but some layouts would
    fit, the refusal that alone rules out the most of them and the flags of the first it rules out (else
    None). The global batch (batch_size x gradient_accumulation_steps x data-parallel replicas) stays as it
    is. Whether a layout is accepted is asked of the run's own checks (config_refusals, layout_refusals),
    never decided here.

    The grid: tp in 1, 2, 4, 8 (with sequence parallelism or without), pp dividing world_size / tp, FSDP or
    not, activation checkpointing or not, micro-batches of the run's size or smaller. The first that fits, in
    the order of what it costs (Narayanan et al. 2021, section 3): no recomputation (a third more compute),
    then no FSDP (1.5x DDP's communication, and again for every accumulated micro-batch), then the smallest
    model-parallel size tp x pp (their takeaway 2: model parallelism just large enough to fit, the rest data
    parallel), tensor parallelism before pipeline stages at equal size (takeaway 1: tp up to the GPUs of a
    node, then pp), then the largest micro-batch, then sequence parallelism (less activation memory)."""
    current = dry_run_layout(cfg, world_size)
    sequences = cfg.batch_size * cfg.gradient_accumulation_steps * current.dp   # the global batch
    micro_sizes = [current.micro_batch // 2 ** i for i in range(current.micro_batch.bit_length())
                   if current.micro_batch % 2 ** i == 0] + [1]
    candidates = []
    for tp, pp, fsdp, checkpointing, micro, sp in itertools.product(TP_SIZES, range(1, world_size + 1), (False, True),
                                                                    (False, True), set(micro_sizes), (True, False)):
        dp = world_size // (tp * pp)
        if (world_size % (tp * pp) or sequences % dp or (sequences // dp) % micro
                or fsdp and dp == 1 or sp and tp == 1):   # FSDP over one replica, SP over one rank: nothing split
            continue
        cost = (checkpointing, fsdp, tp * pp, -tp, -micro, not sp)    # the order of preference
        candidates.append((cost, tp, pp, dp, fsdp, checkpointing, micro, sp))
    cuts, refused = {}, []                 # plan_stages' cuts, kept across the layouts of this model
    now = {**dataclasses.asdict(cfg), **dataclasses.asdict(model_cfg)}
    dtype = planned_dtype(cfg)
    for _, tp, pp, dp, fsdp, checkpointing, micro, sp in sorted(candidates):
        per_replica = sequences // dp
        m = per_replica // micro if pp > 1 else 1           # one pipeline flush per step: the smallest bubble
        values = {"pp": pp, "tp": tp, "fsdp": fsdp, "sequence_parallel": sp, "activation_checkpointing": checkpointing,
                  "batch_size": m * micro, "gradient_accumulation_steps": per_replica // (m * micro),
                  "n_microbatches": m if pp > 1 else cfg.n_microbatches}
        config = dataclasses.replace(model_cfg, activation_checkpointing=checkpointing)
        layout = dataclasses.replace(current, pp=pp, dp=dp, tp=tp, fsdp=fsdp, sequence_parallel=sp,
                                     n_microbatches=m, micro_batch=micro)
        fullest = max(sum(estimate.values()) for _, _, estimate in plan_memory(config, layout, cuts)) / GIB
        if fullest > FIT_FRACTION * memory_gib:
            continue
        flags = [f"--{name}" if value is True else f"--{name}={value}" for name, value in values.items()
                 if value != now[name]]
        run = dataclasses.replace(cfg, dry_run=False, **{k: v for k, v in values.items()
                                                        if k != "activation_checkpointing"})
        # The first refusal of each kind: those of the flags and those of the layout are independent checks.
        refusals = {next(config_refusals(run, config), None),
                    next(layout_refusals(run, world_size, dtype), None)} - {None}
        if refusals:
            refused.append((flags, refusals))
            continue
        return (flags, layout, fullest), None
    if not refused:
        return None, None
    # The refusal that alone rules out the most layouts that would fit (then: that rules out the most), with
    # the first of them: lifting it would give a layout.
    alone = collections.Counter(next(iter(reasons)) for _, reasons in refused if len(reasons) == 1)
    among = collections.Counter(reason for _, reasons in refused for reason in reasons)
    reason = max(among, key=lambda r: (alone[r], among[r]))
    ruled_out = [flags for flags, reasons in refused if reasons == {reason}] or \
        [flags for flags, reasons in refused if reason in reasons]
    return None, (ruled_out[0], reason)


def dry_run_report(cfg, model_cfg: GPTConfig) -> list[str]:
    """The plan of a run, as lines to print: the layout (pp x dp or fsdp x tp), parameters (total and per
    pipeline stage), FLOPs per token, tokens per optimizer step, estimated memory per GPU (plan_memory) and
    time per step (step_seconds) on cfg.dry_run_gpu at cfg.dry_run_mfu, and when the plan does not fit, a
    layout that does (find_layout). The parameters are counted on a block, the embedding and the head built
    on the meta device: shapes without memory, seconds even for 175B parameters."""
    world_size = cfg.dry_run_world_size or cfg.pp * cfg.tp
    layout = dry_run_layout(cfg, world_size)
    T, gpu = model_cfg.block_size, cfg.dry_run_gpu
    n_params = rank_params(model_cfg, param_counts(model_cfg, 1), model_cfg.n_layer, True, True)[0]
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * layout.dp * T
    flops_token = flops_per_token(model_cfg, n_params, T)
    peak, memory = PEAK_BF16_FLOPS[gpu], GPU_MEMORY_GIB[gpu]
    lines = [f"dry run: {cfg.preset or 'custom model'} on {world_size} x {gpu} ({memory} GiB, {peak / 1e12:.0f} "
             f"TFLOP/s at 16 bits) | {describe_layout(layout)} | "
             f"{'fp32' if layout.act_bytes == 4 else planned_dtype(cfg) + ' autocast'}",
             f"parameters: {n_params:,} ({n_params / 1e9:.3f}B) | {model_cfg.n_layer} layers, {model_cfg.n_head} "
             f"heads, {model_cfg.n_embd} channels, context {T}, vocabulary {model_cfg.vocab_size:,}",
             f"FLOPs per token: {flops_token / 1e9:.2f} GFLOP (forward + backward: 6N + 12LHDT)",
             f"tokens per optimizer step: {tokens_per_step:,} ({cfg.batch_size} sequences x "
             f"{cfg.gradient_accumulation_steps} micro-steps x {layout.dp} data-parallel x {T} tokens)"]
    split = [f"1/{layout.tp} of the matmuls and embeddings by tp"] if layout.tp > 1 else []
    split += [f"1/{layout.dp} of the weights by FSDP"] if layout.fsdp else []
    lines.append(f"memory per GPU in GiB (micro-batches of {layout.micro_batch} x {T} tokens"
                 + "".join(f"; {s}" for s in split) + "):")
    too_big = []
    for name, params, estimate in plan_memory(model_cfg, layout):
        total = sum(estimate.values()) / GIB
        parts = " + ".join(f"{kind} {value / GIB:.2f}" for kind, value in estimate.items() if value)
        lines.append(f"  {name}: {params:,} params | {parts} = {total:.2f} GiB")
        if total > memory:
            too_big.append((total, name))
    seconds = step_seconds(model_cfg, flops_token * tokens_per_step, layout, peak, cfg.dry_run_mfu)
    total = sum(seconds.values())
    parts = f"compute {seconds['compute']:.2f} s"
    if seconds["recompute"]:
        parts += f" + recompute {seconds['recompute']:.2f} s (activation checkpointing)"
    if seconds["bubble"]:
        parts += (f" + pipeline bubble {seconds['bubble']:.2f} s ((p-1)/{'vm' if layout.chunks > 1 else 'm'} = "
                  f"{layout.pp - 1}/{layout.chunks * layout.n_microbatches})")
    overall = cfg.dry_run_mfu * seconds["compute"] / total
    lines.append(f"time per step: {total:.2f} s at {cfg.dry_run_mfu:.0%} MFU on {world_size} x {gpu} while "
                 f"computing ({tokens_per_step / total:,.0f} tokens/s, {overall:.0%} MFU overall) = {parts}; "
                 f"tp/dp communication not modeled")
    if too_big:
        found, refused = find_layout(cfg, model_cfg, world_size, memory)
        if found:
            advice = f"{' '.join(found[0])} fits ({describe_layout(found[1])}, {found[2]:.1f} GiB on the fullest GPU)"
        elif refused:
            advice = (f"no layout of {world_size} GPUs that train.py accepts fits: {' '.join(refused[0])} would, "
                      f"but {refused[1]}")
        else:
            advice = f"no layout of {world_size} GPUs fits (tp <= 8): plan more GPUs"
        fullest, name = max(too_big)
        more = f" and {len(too_big) - 1} more stage{'s' if len(too_big) > 2 else ''}" if len(too_big) > 1 else ""
        lines.append(f"warning: does not fit a {memory} GiB {gpu}: {name} needs {fullest:.1f} GiB{more}; {advice}")
    return lines

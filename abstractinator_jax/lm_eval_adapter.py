"""EleutherAI lm-eval adapter (optional extra `eval`: `pip install -e ".[eval]"`): the model class `abstractinator`.

    python -m abstractinator_jax.lm_eval_adapter run --model abstractinator \\
        --model_args workdir=runs/tiny,batch_size=8 --tasks lambada_openai

(this module registers the class, then hands the command line to lm-eval's own CLI; from Python, import this module
and pass `model="abstractinator"` or an `AbstractinatorLM` to `lm_eval.simple_evaluate`). Model arguments:
`workdir` (a train.py run), `step` (default: the latest checkpoint), `batch_size` (rows per scoring batch; default
the run's), `scorer` (`code`: the whole model's code length, which needs a discrete top transformer; or
`entropy_model`: level 0's logit entropy model as a plain byte LM).

Log-likelihoods come from the code-length machinery of scoring.py, in nats: `loglikelihood_rolling(text)` is
-ln 2 times the code length of `[BOS] + bytes(text)` (no EOS: the text may go on), its rows coded independently;
`loglikelihood(context, continuation)` is rolling(context + continuation) - rolling(context). A segment's code is
computed from the whole segment, so the model assigns no probability to a prefix on its own: this difference of two
code lengths is what it has (the context's term is the same for every choice of a multiple-choice question, which
are therefore ranked by the code length of the whole text). `is_greedy` is False until generation exists.
"""

from __future__ import annotations

import math

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .evaluation import TextScorer

LN2 = math.log(2.0)


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
        **_ignored,  # lm-eval's device / max_batch_size: JAX places the model itself
    ):
        super().__init__()
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

    def generate_until(self, requests) -> list[str]:
        # GENERATION HOOK: when the model can generate bytes (cached generation), decode greedily here from each
        # request's context until one of gen_kwargs['until'] appears (or max_gen_toks bytes), and return the texts.
        # loglikelihood's `is_greedy` can then be computed too.
        raise NotImplementedError(
            "abstractinator: generate_until needs byte generation, which this version does not have yet; use "
            "loglikelihood, multiple-choice or perplexity (loglikelihood_rolling) tasks."
        )


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    from .checkpointing import CheckpointError
    from .cli import fail
    from .config import ConfigError

    try:
        cli_evaluate()
    except (ConfigError, CheckpointError) as e:  # a bad workdir / scorer: one line, not lm-eval's traceback
        fail(str(e))

"""Failure confinement: a request that breaks a step fails alone; everyone else keeps generating.

One batch carries many unrelated requests, so a step that raises must not take them all down
(a NaN-producing request used to fail every stream on its model). Two mechanisms, both free on
the happy path:

* **Unusable rows are flagged, not sampled.** :func:`flag_unusable_rows` marks a row whose
  logits have no finite maximum (NaN, +inf, or everything masked away) or whose sampling
  distribution has no finite, positive mass: ``-1`` when the raw model logits were fine (the
  request's own sampling parameters broke them: ``ValueError``, INVALID_ARGUMENT for a service),
  ``-2`` when the model itself produced them (``RuntimeError``: a server problem). The flag
  travels in the step's one host sync with the token ids; the engine fails those requests alone.
  Rows never mix, so a flagged row changes no other row's token.
* **A step that raises is re-run one request at a time** (:func:`execute_each`): each decode row
  and each prefill chunk alone, replaying the random draws the failed step already took from the
  requests' own streams (:class:`Replay`), so a seeded request draws exactly what it would have.
  Those that raise again fail alone; the others get their tokens (the same tokens, up to the
  float rounding a different batch size can cause; see :mod:`lmcore.engine.engine`). Keys and
  values a failed attempt wrote are rewritten at the same positions by the re-run.
"""

from __future__ import annotations

import torch

from .scheduler import SchedulerOutput

UNUSABLE_BY_PARAMS = -1  # the raw logits were finite: the request's sampling parameters broke them
UNUSABLE_BY_MODEL = -2  # the model's own logits were not finite


def flag_unusable_rows(ids: torch.Tensor, best: torch.Tensor, raw: torch.Tensor | None) -> torch.Tensor:
    """``ids`` (R,) with rows that cannot give a token replaced by -1/-2 (see the module docstring).

    ``best`` is the row maximum of the (penalised) logits; ``raw`` the unpenalised logits when they
    differ (None: ``best`` is their maximum too). Sampled rows come in already ``-1`` when their
    distribution had no usable mass (:func:`lmcore.engine.sampling.sample_from_probs`).
    """
    raw_ok = torch.isfinite(best if raw is None else raw.max(-1).values)
    ok = torch.isfinite(best) & (ids >= 0)
    flag = torch.where(raw_ok, UNUSABLE_BY_PARAMS, UNUSABLE_BY_MODEL)
    return torch.where(ok, ids, flag)


def unusable_error(code: int, params) -> Exception:
    """The exception a request with a flagged row fails with."""
    if code == UNUSABLE_BY_MODEL:
        return RuntimeError("the model produced non-finite logits (NaN or infinity) for this request")
    return ValueError(
        f"this request's sampling parameters made the logits non-finite (temperature {params.temperature}, "
        f"repetition_penalty {params.repetition_penalty}, presence_penalty {params.presence_penalty}, "
        f"frequency_penalty {params.frequency_penalty}): use values closer to their defaults")


class Replay:
    """Stands in for a request's ``random.Random`` on a re-run: hands back the draw already taken."""

    __slots__ = ("value",)

    def __init__(self, value: float):
        self.value = value

    def random(self) -> float:
        return self.value


def execute_each(runner, plan: SchedulerOutput, params: dict, rngs: dict) -> tuple:
    """Re-run a failed step one request at a time: ``(samplers, token_ids, logprobs, failures)``
    where ``failures`` maps a request id to the exception its own run raised."""
    rngs = dict(rngs)
    if runner.last_draws is not None:  # the failed step took these draws already: replay them
        for seq, u in zip(*runner.last_draws):
            rngs[seq.request_id] = Replay(u)
    units = [SchedulerOutput([seq], [], []) for seq in plan.decode]
    units += [SchedulerOutput([], [chunk], []) for chunk in plan.prefill]
    samplers, token_ids, failures = [], [], {}
    chosen, values, top = [], [], []
    any_lp = False
    for unit in units:
        seq = unit.decode[0] if unit.decode else unit.prefill[0].seq
        try:
            s, ids, lp = runner.execute(unit, params, rngs)
        except Exception as e:  # noqa: BLE001 - this request's own failure, reported to it alone
            failures[seq.request_id] = e
            continue
        samplers += s
        token_ids += ids
        if lp is not None:
            any_lp = True
            chosen += lp[0]
            values += lp[1]
            top += lp[2]
        else:  # rows without log-probabilities: placeholders the engine never reads
            chosen += [0.0] * len(s)
            values += [[]] * len(s)
            top += [[]] * len(s)
    return samplers, token_ids, (chosen, values, top) if any_lp else None, failures

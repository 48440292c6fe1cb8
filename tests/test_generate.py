import torch

from baseq_export.generate import argmax_token, greedy_tokens


def test_argmax_token_picks_torch_argmax_including_ties_and_nan():
    """The numpy fast path chooses the token torch.argmax chooses: the first of equal maxima, a NaN over any
    number, on float32 and (through torch) on other dtypes."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        logits = torch.randint(-3, 4, (50,), generator=gen).float()  # many ties
        if trial % 5 == 0:
            logits[int(torch.randint(0, 50, (1,), generator=gen))] = float("nan")
        assert argmax_token(logits) == int(torch.argmax(logits))
        assert argmax_token(logits.double()) == int(torch.argmax(logits.double()))
    assert argmax_token(torch.tensor([0.5, 2.0, 1.0], requires_grad=True)) == 1  # a tensor that tracks gradients


def test_greedy_tokens_follow_the_argmax_of_each_step():
    """greedy_tokens feeds each chosen token back and stops after eos: checked on a stepper whose logits are a
    fixed table indexed by the last token (the next token is (last * 7 + 3) mod 11)."""
    table = torch.full((11, 11), -1.0)
    for t in range(11):
        table[t, (t * 7 + 3) % 11] = 1.0
    seen = []

    def step(ids):
        seen.append(list(ids))
        return table[ids[-1]]

    want, t = [], 2
    for _ in range(6):
        t = (t * 7 + 3) % 11
        want.append(t)
    assert greedy_tokens(step, [5, 2], 6) == want
    assert seen[0] == [5, 2] and [s[0] for s in seen[1:]] == want[:-1]
    eos = want[2]
    assert greedy_tokens(step, [5, 2], 6, eos=eos) == want[:3]

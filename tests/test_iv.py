"""IV against a plain one-episode-at-a-time reference loop written from the paper's algorithm."""

import torch

from ivlib.episodes import sample_episodes
from ivlib.methods.icl import ICL
from ivlib.methods.iv import IterativeVectors, refresh_windows
from ivlib.scoring import Scorer


def _plain_reads(lm, ids, positions, adds=None):
    """One prompt, no padding: o_proj outputs at `positions` per layer, after adding adds[l] ([P, D])."""
    reads, handles = [], []
    for layer, module in enumerate(lm.layout.attn_out):

        def hook(_mod, _args, out, layer=layer):
            out = out.clone()
            if adds is not None:
                out[0, positions] += adds[layer]
            reads.append(out[0, positions].clone())
            return out

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(reads)  # [L, P, D]


def reference_extract(lm, encoder, episodes, a1, b):
    """Algorithm 1 as written: samples averaged, refreshed after episode 0 and every b episodes."""
    n_slots = encoder.n_classes + 1
    samples, current = [], None
    for i, ep in enumerate(episodes):
        pos = encoder.encode(ep)
        neg = encoder.encode(ep.query_only())
        adds = None if current is None else a1 * current[:, pos.sep_class]
        pos_read = _plain_reads(lm, pos.ids, pos.sep_pos, adds)  # [L, P, D]
        neg_read = _plain_reads(lm, neg.ids, neg.sep_pos)[:, -1:]  # [L, 1, D] at the separator itself
        delta = pos_read - neg_read
        sample = torch.stack(
            [delta[:, [j for j, c in enumerate(pos.sep_class) if c == k]].mean(1) for k in range(n_slots)], dim=1
        )  # [L, C+1, D]
        samples.append(sample)
        if b > 0 and i % b == 0:
            current = torch.stack(samples).mean(0)
    return torch.stack(samples).mean(0)


def test_refresh_windows():
    assert refresh_windows(7, 3) == [[0], [1, 2, 3], [4, 5, 6]]
    assert refresh_windows(4, 0) == [[0, 1, 2, 3]]


def test_batched_extraction_equals_reference_loop(lm, encoder, task):
    episodes = sample_episodes(task.splits["train"], 2, 2, 9, seed=1, stream="train/extract")
    expected = reference_extract(lm, encoder, episodes, a1=0.7, b=3)
    for batch_size in (2, 8):
        iv = IterativeVectors(strength=0.5, ext_strength=0.7, ext_batch=3)
        iv.fit(Scorer(lm, encoder.label_ids, batch_size, quiet=True), encoder, episodes)
        assert iv.vectors.shape == (lm.layout.n_layers, 3, lm.layout.d_model)
        torch.testing.assert_close(iv.vectors, expected, atol=1e-5, rtol=1e-4)


def test_iteration_changes_the_vectors(lm, encoder, task):
    episodes = sample_episodes(task.splits["train"], 2, 1, 7, seed=2, stream="train/extract")
    scorer = Scorer(lm, encoder.label_ids, 4, quiet=True)
    one_pass, iterated = IterativeVectors(0.5, 0.9, 0), IterativeVectors(0.5, 0.9, 2)
    one_pass.fit(scorer, encoder, episodes)
    iterated.fit(scorer, encoder, episodes)
    torch.testing.assert_close(one_pass.vectors, reference_extract(lm, encoder, episodes, 0.9, 0), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(one_pass.vectors, iterated.vectors, atol=1e-4)


def test_zero_shot_side_is_read_at_the_separator_not_the_token_before(gpt2, task):
    """The reference release reads the zero-shot prompt one token early; ivlib must not."""
    from ivlib.prompts import PromptEncoder

    encoder = PromptEncoder(gpt2.tokenizer, task.label_words, add_bos=True)
    ep = sample_episodes(task.splits["train"], 2, 1, 1, seed=5, stream="train/extract")
    iv = IterativeVectors(0.5, 0.3, 0)
    iv.fit(Scorer(gpt2, encoder.label_ids, 4, quiet=True), encoder, ep)
    pos = encoder.encode(ep[0])
    neg = encoder.encode(ep[0].query_only())
    pos_q = _plain_reads(gpt2, pos.ids, pos.sep_pos[-1:])[:, 0]
    at_sep = _plain_reads(gpt2, neg.ids, [neg.sep_pos[-1]])[:, 0]
    before = _plain_reads(gpt2, neg.ids, [neg.sep_pos[-1] - 1])[:, 0]
    torch.testing.assert_close(iv.vectors[:, 2], pos_q - at_sep, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(iv.vectors[:, 2], pos_q - before, atol=1e-3)


def test_evaluation_adds_strength_times_vectors_at_every_separator(lm, encoder, task):
    episodes = sample_episodes(task.splits["validation"], 2, 1, 3, seed=4, stream="validation/eval")
    scorer = Scorer(lm, encoder.label_ids, 8, quiet=True)
    iv = IterativeVectors(strength=0.8, ext_strength=0.3, ext_batch=0)
    torch.manual_seed(0)
    iv.load_state({"vectors": torch.randn(lm.layout.n_layers, 3, lm.layout.d_model)})
    for ep in episodes:
        p = encoder.encode(ep)
        got = iv.predict(scorer, scorer.batch([p]))
        adds = 0.8 * iv.vectors[:, p.sep_class]
        # reference: plain forward with the same edit, full logits at the last position
        handles = []
        for layer, module in enumerate(lm.layout.attn_out):

            def hook(_mod, _args, out, layer=layer):
                out = out.clone()
                out[0, p.sep_pos] += adds[layer]
                return out

            handles.append(module.register_forward_hook(hook))
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([p.ids])).logits[0, -1]
        for h in handles:
            h.remove()
        expected = torch.log_softmax(logits, -1)[encoder.label_ids]
        torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(got[0], ICL().predict(scorer, scorer.batch([p]))[0], atol=1e-4)


def test_batched_predictions_equal_one_at_a_time(lm, encoder, task):
    episodes = sample_episodes(task.splits["validation"], 2, 1, 12, seed=9, stream="validation/eval")
    prompts = [encoder.encode(e) for e in episodes]
    train = sample_episodes(task.splits["train"], 2, 1, 5, seed=9, stream="train/extract")
    iv = IterativeVectors(strength=0.9, ext_strength=0.5, ext_batch=2)
    iv.fit(Scorer(lm, encoder.label_ids, 4, quiet=True), encoder, train)
    for method in (ICL(), iv):
        results = []
        for batch_size in (1, 5):
            scorer = Scorer(lm, encoder.label_ids, batch_size, quiet=True)
            results.append(scorer.runner.map(prompts, lambda b: method.predict(scorer, b), "t"))
        torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)

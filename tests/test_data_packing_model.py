"""Packed rows through the model: each segment's logits equal the conversation run alone.

Reference for "alone": transformers' LlamaForCausalLM (torch, fp32) on the bundled
stories260k weights, plus our model on the unpacked conversation (1e-5, fp32).
"""

import numpy as np
import pytest
from conftest import DATA, REPO

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STORIES = REPO / "lumos_jax" / "assets" / "stories260k"


def test_packed_logits_equal_each_conversation_alone():
    from lumos_jax.data.loader import make_train_iterator
    from lumos_jax.checkpoints.hf import load_hf_model
    from lumos_jax.tokenization import Tokenizer

    tok = Tokenizer(STORIES, add_pad_token=False)
    files = [str(DATA / "lumos" / "annotations" / f"lumos_{d}_plan_onetime.jsonl") for d in ("maths", "web_agent")]
    # At 120 tokens these conversations keep no assistant token: kept anyway (masking is
    # under test here, not the loss).
    it = make_train_iterator(files, tok, seq_len=512, max_seq_length=120, batch_size=2, packing=True,
                             seed=0, num_epochs=1, process_index=0, process_count=1,
                             drop_untrained=False)
    batch = next(it)
    assert (batch["segment_ids"].max(axis=1) >= 4).all()  # several conversations per row
    firsts = {batch["input_ids"][b][(batch["segment_ids"][b] == s)].tobytes()
              for b in range(2) for s in range(1, 5)}
    assert len(firsts) >= 6  # distinct conversations, not copies of one prompt

    model = load_hf_model(STORIES, dtype="float32", param_dtype="float32")
    packed = np.asarray(model(batch["input_ids"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"]))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(STORIES), torch_dtype=torch.float32).eval()
    checked = 0
    for b in range(batch["input_ids"].shape[0]):
        for s in sorted(set(batch["segment_ids"][b].tolist()) - {0}):
            sel = batch["segment_ids"][b] == s
            ids = batch["input_ids"][b][sel]
            # Alone: the same row with every other conversation replaced by padding (segment 0),
            # so only the masking across segments is under test, not fp32 reduction order.
            solo = {k: np.where(sel, v[b], 0)[None] for k, v in batch.items()}
            alone = np.asarray(model(solo["input_ids"], positions=solo["positions"],
                                     segment_ids=solo["segment_ids"]))[0][sel]
            np.testing.assert_allclose(packed[b][sel], alone, rtol=0, atol=1e-5)
            with torch.no_grad():
                ref = hf(input_ids=torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()
            np.testing.assert_allclose(packed[b][sel], ref, rtol=0, atol=1e-4)
            checked += 1
    assert checked >= 8

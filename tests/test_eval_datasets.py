"""Readers of the reference's evaluation files: counts, golds, subsets, bad input."""

import json

import pytest

from conftest import DATA
from lumos_jax.evaluation import datasets as d
from lumos_jax.evaluation import user_datasets as u
from lumos_jax.evaluation.metrics import numeric_match

EVAL = DATA / "eval"


def test_bundled_sets_and_golds():
    gsm = d.read_gsm8k(EVAL / "gsm8k_test.jsonl")
    assert len(gsm) == 1319 and gsm[0].answer == "18" and gsm[0].question.startswith("Janet")
    assert all("," not in ex.answer for ex in gsm)
    svamp = d.read_svamp(EVAL / "svamp_test.json")
    assert len(svamp) == 1000 and svamp[0].id == "chal-1" and svamp[0].answer == "51"
    assert svamp[0].question == ("Each pack of dvds costs 76 dollars. If there is a discount of 25 "
                                 "dollars on each pack How much do you have to pay to buy each pack?")
    sqa = d.read_strategyqa(EVAL / "strategyqa_test.json")
    assert len(sqa) == 2290 and sqa[0].answer is True
    hot = d.read_hotpotqa(EVAL / "hotpotqa_dev.json")
    assert len(hot) == 7405 and hot[0].answer == "yes"


def test_distractor_documents_match_dev_list():
    dis = d.read_hotpotqa_distractor(EVAL / "hotpotqa_dev_distractor_sample.jsonl")
    dev = d.read_hotpotqa(EVAL / "hotpotqa_dev.json")
    assert len(dis) == 103
    assert [e.question for e in dis] == [e.question for e in dev[:103]]
    assert sum(len(e.meta["documents"]) == 10 for e in dis) == 102
    assert len(dis[27].meta["documents"]) == 2
    first = dis[0].meta["documents"][0]
    assert first["title"] == "Ed Wood (film)" and first["text"].startswith("Ed Wood is a 1994")
    assert set(dis[0].meta["supporting_titles"]) == {"Scott Derrickson", "Ed Wood"}


def test_reference_subsets():
    sqa = d.read_strategyqa(EVAL / "strategyqa_test.json")
    assert d.READERS["strategyqa"][2] == 300 and d.READERS["hotpotqa"][2] == 1000
    assert d.select_subset(sqa, 0, 300) == sqa[:300]
    assert d.select_subset(sqa, 10, 5) == sqa[10:15]
    with pytest.raises(ValueError):
        d.select_subset(sqa, -1, 2)


def test_bad_files_name_file_and_row(tmp_path):
    bad = tmp_path / "gsm.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 3"}\n{oops\n')
    with pytest.raises(d.DatasetError, match=r"gsm.jsonl:2"):
        d.read_gsm8k(bad)
    bad.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(d.DatasetError, match=r"gsm.jsonl:1: .*####"):
        d.read_gsm8k(bad)
    js = tmp_path / "sqa.json"
    js.write_text(json.dumps([{"question": "q", "answer": "yes"}]))
    with pytest.raises(d.DatasetError, match=r"sqa.json\[0\]: field 'answer'"):
        d.read_strategyqa(js)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        d.read_svamp(tmp_path / "nope.json")


def test_user_formats(tmp_path):
    aok = tmp_path / "aokvqa_v1p0_val.json"
    aok.write_text(json.dumps([{"split": "val", "image_id": 461751, "question_id": "22MexNkBPpdZGX6sxbxVBH",
                                "question": "What is the man by the bags awaiting?",
                                "choices": ["skateboarder", "train", "delivery", "cab"],
                                "correct_choice_idx": 3, "direct_answers": ["ride"] * 4 + ["cab"] * 6}]))
    ex = u.read_aokvqa(aok, coco_dir="/coco")[0]
    assert ex.answer == 3 and ex.meta["image"] == "/coco/val2017/000000461751.jpg"
    sqa = tmp_path / "problems.json"
    sqa.write_text(json.dumps({"5": {"question": "Which is a mammal?", "choices": ["frog", "cat"],
                                     "answer": 1, "split": "test", "image": None},
                               "6": {"question": "x", "choices": ["a"], "answer": 0, "split": "train"}}))
    got = u.read_scienceqa(sqa)
    assert [e.id for e in got] == ["5"] and got[0].answer == 1
    ws = tmp_path / "goals.json"
    ws.write_text(json.dumps([{"instruction_text": "i need a red shirt", "asin": "B0"}]))
    assert u.read_webshop(ws)[0].question == "i need a red shirt"
    ic = tmp_path / "ic.json"
    ic.write_text(json.dumps([{"db": "concert_singer", "query": "How many singers?",
                               "gold": "SELECT count(*) FROM singer", "hardness": "easy"}]))
    e = u.read_intercode_sql(ic, db_dir="/db")[0]
    assert e.meta["db_path"] == "/db/concert_singer/concert_singer.sqlite"


def test_sql_execution_match(tmp_path):
    import sqlite3

    db = tmp_path / "shop" / "shop.sqlite"
    db.parent.mkdir()
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (a INT)")
    con.executemany("INSERT INTO t VALUES (?)", [(1,), (2,), (3,)])
    con.commit()
    con.close()
    ic = tmp_path / "ic.json"
    ic.write_text(json.dumps([{"db": "shop", "query": "how many?", "gold": "SELECT count(*) FROM t"}]))
    ex = u.read_intercode_sql(ic, db_dir=tmp_path)[0]
    assert u.sql_execution_match("select COUNT(a) from t", ex)
    assert not u.sql_execution_match("SELECT count(*) FROM t WHERE a > 1", ex)
    assert not u.sql_execution_match("DROP TABLE t", ex)  # read-only: fails, counts wrong
    assert not u.sql_execution_match("garbage", ex)
    assert numeric_match("3", "3")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.mark.parametrize("name", ["gsm8k", "strategyqa", "hotpotqa", "svamp"])
def test_tfds_builders_agree_with_file_readers(name, tfds_dir):
    from lumos_jax.evaluation.experiment import load_dataset

    via_tfds = load_dataset(name, source="tfds", tfds_data_dir=str(tfds_dir), limit=None)
    via_files = load_dataset(name)
    assert len(via_tfds) == len(via_files)
    assert [(e.id, e.question, e.answer) for e in via_tfds] == [(e.id, e.question, e.answer) for e in via_files]

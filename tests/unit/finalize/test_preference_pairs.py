"""`train.format: preference`, in process: pairs built per prompt in finalize's group pass (best
with worst within the rules), counts in stats.json against a direct computation, seeds, dedup and
the validation split, agent episodes, several formats from one pass. (TRL's DPOTrainer on the
pairs and a real run: tests/e2e/test_preference.py.)"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from handmade import agent_rollout, read_rows, single_rollout, write_run

from sft_ray.finalize.curate import Scored, make_pairs
from sft_ray.finalize.passes import finalize


def scored(reward: float, key: str) -> Scored:
    return Scored("p", key, reward, True, "", "", None, 0, None, b"", b"{}")


def test_pairs_best_with_worst_within_the_rules():
    s = [scored(r, k) for r, k in [(1.0, "a"), (0.0, "b"), (0.9, "c"), (0.2, "d"), (0.5, "e")]]
    assert make_pairs(s, 0.5, 0.0, 1) == ([(0, 1)], None)
    assert make_pairs(s, 0.5, 0.0, 3) == ([(0, 1), (2, 3)], None)  # 0.5 is left: it would pair with itself
    assert make_pairs(s, 0.8, 0.0, 3) == ([(0, 1)], None)  # 0.9 - 0.2 < 0.8: stop
    assert make_pairs([scored(1.0, "a")], 0.5, 0.0, 1) == ([], "one_sample")
    assert make_pairs([scored(0.4, "a"), scored(0.0, "b")], 0.3, 0.5, 1) == ([], "none_passed")
    assert make_pairs([scored(1.0, "a"), scored(0.9, "b")], 0.5, 0.5, 1) == ([], "all_passed")
    assert make_pairs([scored(0.6, "a"), scored(0.3, "b")], 0.5, 0.5, 1) == ([], "margin_too_small")
    # equal rewards: the shuffle key (the seed) decides which is chosen and which rejected
    ties = [scored(1.0, "b"), scored(1.0, "a"), scored(0.0, "d"), scored(0.0, "c")]
    assert make_pairs(ties, 0.5, 0.0, 2) == ([(1, 3), (0, 2)], None)


def expected_counts(rows, min_margin=0.5, chosen_min=0.0, max_pairs=1):
    """The preference section computed straight from the rollouts, without finalize's code."""
    by_prompt = defaultdict(list)
    for r in rows:
        by_prompt[r["id"]].append(r["reward"])
    pairs, reasons = 0, defaultdict(int)
    for rewards in by_prompt.values():
        best, worst = sorted(rewards, reverse=True), sorted(rewards)
        made = 0
        for i in range(min(max_pairs, len(rewards) // 2)):
            if best[i] >= chosen_min and best[i] - worst[i] >= min_margin:
                made += 1
            else:
                break
        pairs += made
        if not made:
            reason = ("one_sample" if len(rewards) < 2 else "none_passed" if max(rewards) < chosen_min
                      else "all_passed" if min(rewards) >= chosen_min else "margin_too_small")
            reasons[reason] += 1
    return pairs, dict(reasons)


def single_rows():
    rows = []
    rewards = {0: [1.0, 0.0, 1.0, 0.0], 1: [1.0, 1.0, 1.0, 1.0], 2: [0.0, 0.0, 0.0, 0.0], 3: [0.6, 0.4, 0.5, 0.3],
               4: [1.0], 5: [0.9, 0.1, 0.7, 0.0], 6: [1.0, 0.2, 0.8, 0.4]}
    for i, rs in rewards.items():
        rows += [single_rollout(i, k, reward=r, response=f"answer {i}.{k}") for k, r in enumerate(rs)]
    return rows


@pytest.mark.parametrize("max_pairs", [1, 2])
def test_preference_counts_match_a_direct_computation(tmp_path, max_pairs):
    rows = single_rows()
    write_run(tmp_path, rows, files=3)
    stats = finalize(str(tmp_path), {"min_reward": 0.5}, 7, {"format": "preference", "rows_per_shard": 3},
                     preference={"max_pairs_per_prompt": max_pairs})
    pairs, reasons = expected_counts(rows, chosen_min=0.5, max_pairs=max_pairs)
    pref = stats["preference"]
    assert pref["pairs"] == pairs and stats["train_rows"] == pairs and sum(stats["shards"]) == pairs
    assert {k: v for k, v in pref["no_pair_by_reason"].items() if v} == reasons
    assert pref["prompts_without_pair"] == sum(reasons.values())
    out = read_rows(tmp_path / "train")
    assert len(out) == pairs
    for row in out:
        assert set(row) == {"prompt", "chosen", "rejected"}
        i = int(row["prompt"][0]["content"].split()[-1])
        assert row["prompt"] == [{"role": "user", "content": f"question {i}"}]
        (c,), (r,) = row["chosen"], row["rejected"]
        assert c["role"] == r["role"] == "assistant"
        reward = {(x["id"], x["response"]): x["reward"] for x in rows}
        assert reward[f"s{i}", c["content"]] - reward[f"s{i}", r["content"]] >= 0.5
        assert reward[f"s{i}", c["content"]] >= 0.5
    # best with worst: prompt 5's first pair is 0.9 against 0.0
    p5 = [r for r in out if r["prompt"][0]["content"] == "question 5"]
    assert p5[0]["chosen"][0]["content"] in ("answer 5.0", "answer 5.2")
    assert {p["chosen"][0]["content"] for p in p5} | {p["rejected"][0]["content"] for p in p5} >= {"answer 5.0",
                                                                                                  "answer 5.3"}


def test_same_seed_same_pairs_and_order_other_seed_other_order(tmp_path):
    rows = [single_rollout(i, k, reward=float(k % 2), response=f"a{i}.{k}") for i in range(40) for k in range(4)]
    outs = []
    for n, seed in enumerate((1, 1, 2)):
        write_run(tmp_path / str(n), rows)
        finalize(str(tmp_path / str(n)), {}, seed, {"format": "preference"})
        outs.append(read_rows(tmp_path / str(n) / "train"))
    assert outs[0] == outs[1] and outs[0] != outs[2]
    assert len(outs[0]) == 40


def test_dedup_and_validation_split_apply_to_pairs(tmp_path):
    # prompt 0's two failing replies are the same text: exact dedup keeps one of them
    rows = [single_rollout(0, 0, 1.0, "right"), single_rollout(0, 1, 0.0, "Wrong"), single_rollout(0, 2, 0.0, "wrong ")]
    rows += [single_rollout(i, k, float(k == 0), f"r{i}.{k}") for i in range(1, 60) for k in range(2)]
    write_run(tmp_path, rows)
    stats = finalize(str(tmp_path), {"dedup": "exact"}, 0,
                     {"format": "preference", "validation_fraction": 0.3},
                     preference={"max_pairs_per_prompt": 2})
    pref = stats["preference"]
    assert pref["pairs"] == 60  # one pair per prompt: prompt 0's duplicate rejected reply is gone
    train, val = read_rows(tmp_path / "train"), read_rows(tmp_path / "validation")
    assert len(train) + len(val) == 60 and len(val) == pref["validation_pairs"] > 0
    assert not {json.dumps(r["prompt"]) for r in train} & {json.dumps(r["prompt"]) for r in val}


def test_agent_episodes_pair_whole_episodes_with_tools(tmp_path):
    rows = [agent_rollout(i, 0, reward=1.0) for i in range(3)]
    bad = [agent_rollout(i, 1, reward=0.0) for i in range(3)]
    for r in bad:  # a worse episode: one call, another answer
        r["messages"][-1] = {"role": "assistant", "content": "I do not know."}
    write_run(tmp_path, rows + bad)
    stats = finalize(str(tmp_path), {"min_reward": 1.0}, 0, {"format": "preference", "include_fields": ["id"]})
    assert stats["preference"]["pairs"] == 3
    for row in read_rows(tmp_path / "train"):
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert [m["role"] for m in row["chosen"]] == ["assistant", "tool", "tool", "assistant"]
        assert row["chosen"][0]["tool_calls"][0]["function"]["arguments"] == {"city": row["id"].replace("p", "city")}
        assert row["rejected"][-1]["content"] == "I do not know." and row["tools"] and row["id"].startswith("p")


def test_several_formats_from_one_pass(tmp_path):
    import datasets

    rows = single_rows()
    write_run(tmp_path, rows)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "part-00000.jsonl").write_text("{}\n")  # a single-format cut from before
    stats = finalize(str(tmp_path), {"min_reward": 0.5}, 0,
                     {"format": ["messages", "preference"], "file_format": "parquet", "rows_per_shard": 4})
    kept = sum(r["reward"] >= 0.5 for r in rows)
    assert sum(stats["shards_by_format"]["messages"]) == kept == stats["train_rows"]
    assert sum(stats["shards_by_format"]["preference"]) == stats["preference"]["pairs"] == expected_counts(rows, 0.5,
                                                                                                          0.5)[0]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["messages", "preference"]
    sft = datasets.load_dataset(str(tmp_path), split="train")  # the first format is the default config
    assert len(sft) == kept and "messages" in sft.column_names
    pref = datasets.load_dataset(str(tmp_path), "preference", split="train")
    assert len(pref) == stats["preference"]["pairs"] and set(pref.column_names) >= {"prompt", "chosen", "rejected"}
    # one format again: the single-format layout comes back, whole
    finalize(str(tmp_path), {"min_reward": 0.5}, 0, {"format": "messages"})
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["part-00000.jsonl"]


def test_format_lists_are_checked():
    from sft_ray.config import ConfigError
    from sft_ray.configload import load_config

    base = ["input=x", "output=y", "model.name=m"]
    assert load_config(None, base + ["train.format=[preference]"]).train.format == "preference"  # one: as a string
    assert load_config(None, base + ["train.format=[messages, preference]"]).train.formats == ["messages",
                                                                                               "preference"]
    for bad, why in (("[]", "empty list"), ("[messages, messages]", "listed twice"), ("[dpo]", "train.format")):
        with pytest.raises(ConfigError, match=why):
            load_config(None, base + [f"train.format={bad}"])
    with pytest.raises(ConfigError, match="preference.min_margin"):
        load_config(None, base + ["preference.min_margin=-1"])
    with pytest.raises(ConfigError, match="include_fields"):
        load_config(None, base + ["train.include_fields=[chosen]"])

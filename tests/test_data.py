"""The data layer: every row format and file type becomes conversations; `#N`, mixing, the built-in
self-cognition set with its placeholders, and the one-sentence errors users see for bad input."""

from __future__ import annotations

import json
import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.data import sources
from tunesmith.data.formats import to_messages
from tunesmith.data.self_cognition import (
    check_no_placeholders,
    general_distill_instructions,
    general_prompts,
    identity_eval_questions,
    parse_name_author,
    self_cognition_rows,
)
from tunesmith.data.sources import load_dataset, load_datasets, split_dataset
from tunesmith.errors import UserError
from tutorial_rows import TUTORIAL_ROWS


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def numbered_rows(n):
    return [{"instruction": f"question {i}", "input": "", "output": f"answer {i}"} for i in range(n)]


def write_json(path, data):
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def answers(convs):
    return [conv[-1]["content"] for conv in convs]


def raises(match):
    return pytest.raises(UserError, match=match)


# --- row formats ---------------------------------------------------------------------------------------------

def test_alpaca_joins_instruction_and_input_and_keeps_system_and_history():
    row = {"instruction": "Translate to French.", "input": "good night", "output": "bonne nuit",
           "system": "You are a translator.", "history": [["Hi", "Hello!"], ["How are you?", "Fine."]]}
    assert to_messages(row, "r") == [
        system("You are a translator."), user("Hi"), assistant("Hello!"), user("How are you?"), assistant("Fine."),
        user("Translate to French.\ngood night"), assistant("bonne nuit")]


def test_alpaca_without_input_and_with_only_input():
    assert to_messages({"instruction": "Hi", "input": "", "output": "Hello"}, "r") == [user("Hi"), assistant("Hello")]
    assert to_messages({"instruction": "", "input": "Hi", "output": "Hello"}, "r") == [user("Hi"), assistant("Hello")]
    assert to_messages({"instruction": "Hi", "input": None, "output": "Hello", "system": None}, "r") == [
        user("Hi"), assistant("Hello")]


def test_sharegpt_from_value_and_role_content():
    from_value = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "user", "value": "Who are you?"}, {"from": "assistant", "value": "A bot."}]}
    assert to_messages(from_value, "r") == [
        system("Be brief."), user("Hi"), assistant("Hello"), user("Who are you?"), assistant("A bot.")]
    role_content = {"conversations": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]}
    assert to_messages(role_content, "r") == [system("Be brief."), user("Hi"), assistant("Hello")]


def test_messages_with_string_and_text_part_content():
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Line one"}, {"type": "text", "text": "line two"}]},
        {"role": "assistant", "content": "Done."}]}
    assert to_messages(row, "r") == [system("Be brief."), user("Line one\nline two"), assistant("Done.")]


def test_query_response_with_history_and_system():
    row = {"query": "And now?", "response": "Still here.", "history": [["Hi", "Hello"]], "system": "S"}
    assert to_messages(row, "r") == [system("S"), user("Hi"), assistant("Hello"), user("And now?"),
                                     assistant("Still here.")]


def test_nested_fields_may_be_json_text_as_in_a_csv_cell():
    row = {"query": "q2", "response": "a2", "history": '[["q1", "a1"]]'}
    assert to_messages(row, "r") == [user("q1"), assistant("a1"), user("q2"), assistant("a2")]


@pytest.mark.parametrize("row, message", [
    ({"instruction": "Hi", "input": ""}, r"data\.json row 4 has no 'output' field"),
    ({"instruction": "Hi", "output": 42}, r"data\.json row 4, field 'output' is a number, not text"),
    ({"instruction": "Hi", "output": "  "}, r"data\.json row 4, field 'output' is empty"),
    ({"query": "Hi"}, r"data\.json row 4 has no 'response' field"),
    ({"prompt": "Hi", "completion": "Yo"}, r"data\.json row 4 has no field this tool knows \(its fields: 'prompt', "),
    ({"messages": [{"role": "user", "content": "Hi"}]}, r"data\.json row 4 has no assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
     r"data\.json row 4, messages\[2\] has content that is a null, not text"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "A cat."}]},
     r"data\.json row 4, messages\[1\] has a content part that is not text"),
    ({"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"},
                   {"role": "assistant", "content": "Yes"}]},
     r"data\.json row 4: turn 1 is from the assistant where the user should speak"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                   {"role": "user", "content": "Bye"}]}, r"data\.json row 4 ends with a user turn"),
    ({"conversations": [{"from": "tool", "value": "{}"}, {"from": "gpt", "value": "ok"}]},
     r"data\.json row 4, conversations\[1\] has from 'tool', which is not supported"),
    ({"conversations": [{"speaker": "human", "text": "Hi"}]},
     r"data\.json row 4, conversations\[1\] needs the fields 'from' and 'value'"),
    ({"query": "Hi", "response": "Yo", "history": [["only a question"]]},
     r"data\.json row 4, history\[1\] is not a \[question, answer\] pair"),
    (["Hi", "Hello"], r"data\.json row 4 is a list, not an object with fields"),
])
def test_bad_rows_name_the_row_and_the_field(row, message):
    with raises(message):
        to_messages(row, "data.json row 4")


# --- file types --------------------------------------------------------------------------------------------

def test_tutorial_file_loads_to_eight_conversations(tmp_path):
    convs = load_dataset(str(write_json(tmp_path / "self_cognition.json", TUTORIAL_ROWS)), seed=42)
    assert len(convs) == 8
    assert convs[0] == [user("你是谁？"), assistant("我是一个由 CSDN 迪菲赫尔曼 开发和维护的大语言模型。")]


def test_every_file_type_and_a_folder(tmp_path):
    rows = numbered_rows(3)
    expected = [[user(f"question {i}"), assistant(f"answer {i}")] for i in range(3)]
    folder = tmp_path / "set"
    (folder / "nested").mkdir(parents=True)
    write_json(folder / "a.json", {"data": rows})
    (folder / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    (folder / "c.csv").write_text("instruction,input,output\n" + "".join(
        f'"{r["instruction"]}",,"{r["output"]}"\n' for r in rows), encoding="utf-8-sig")
    pq.write_table(pa.Table.from_pylist(rows), folder / "nested" / "d.parquet")
    write_json(folder / "dataset_info.json", {"description": "hub metadata, not rows"})
    (folder / "README.md").write_text("not data")
    (folder / ".cache").mkdir()
    write_json(folder / ".cache" / "junk.json", [{"bad": "row"}])

    for name in ("a.json", "b.jsonl", "c.csv", "nested/d.parquet"):
        assert load_dataset(str(folder / name), seed=0) == expected, name
    assert load_dataset(str(folder), seed=0) == expected * 4


def test_json_lines_saved_as_json_still_loads(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("\n".join(json.dumps(r) for r in numbered_rows(2)), encoding="utf-8")
    assert answers(load_dataset(str(path), seed=0)) == ["answer 0", "answer 1"]


def test_parquet_with_sharegpt_lists(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    assert load_dataset(str(tmp_path / "chat.parquet"), seed=0) == [[user("Hi"), assistant("Hello")]]


# --- #N sampling and mixing ----------------------------------------------------------------------------------

@pytest.fixture
def ten_rows(tmp_path):
    return str(write_json(tmp_path / "ten.json", numbered_rows(10)))


def test_count_below_size_takes_distinct_rows(ten_rows):
    picked = answers(load_dataset(f"{ten_rows}#4", seed=1))
    assert len(picked) == 4 and len(set(picked)) == 4


def test_count_above_size_takes_whole_copies_plus_a_distinct_remainder(ten_rows):
    picked = Counter(answers(load_dataset(f"{ten_rows}#23", seed=1)))
    assert sum(picked.values()) == 23
    assert len(picked) == 10 and all(n >= 2 for n in picked.values())
    assert sorted(picked.values()).count(3) == 3


def test_sampling_is_seeded(ten_rows):
    assert load_dataset(f"{ten_rows}#5", seed=7) == load_dataset(f"{ten_rows}#5", seed=7)
    assert load_dataset(f"{ten_rows}#5", seed=7) != load_dataset(f"{ten_rows}#5", seed=8)


def test_a_path_containing_a_hash_is_a_path(tmp_path):
    path = write_json(tmp_path / "take#2", numbered_rows(3))
    assert len(load_dataset(str(path), seed=0)) == 3


def test_mixing_two_sources_concatenates_and_shuffles(tmp_path, ten_rows):
    other = write_json(tmp_path / "other.json", [{"query": f"q{i}", "response": f"other {i}"} for i in range(5)])
    mix = load_datasets([f"{ten_rows}#6", str(other)], seed=3)
    texts = answers(mix)
    assert len(mix) == 11 and sum(t.startswith("other") for t in texts) == 5
    assert texts != sorted(texts, key=lambda t: t.startswith("other"))  # not simply one source after the other
    assert mix == load_datasets([f"{ten_rows}#6", str(other)], seed=3)


def test_split_holds_out_a_seeded_share():
    convs = [[user(f"q{i}"), assistant(f"a{i}")] for i in range(10)]
    train, val = split_dataset(convs, 0.2, seed=0)
    assert len(train) == 8 and len(val) == 2
    assert sorted(answers(train + val)) == sorted(answers(convs))
    assert split_dataset(convs, 0.2, seed=0) == (train, val)
    assert split_dataset(convs, 0.0, seed=0) == (convs, [])
    assert len(split_dataset(convs[:8], 0.01, seed=0)[1]) == 1  # ceil, as datasets.train_test_split
    with raises(r"--split_dataset_ratio must be at least 0 and below 1"):
        split_dataset(convs, 1.0, seed=0)


# --- the built-in self-cognition set -------------------------------------------------------------------------

def test_builtin_set_is_large_and_bilingual():
    rows = self_cognition_rows(None, None)
    tags = Counter(row["tag"] for row in rows)
    assert len(rows) >= 100 and tags["zh"] >= 50 and tags["en"] >= 50
    assert len({row["query"] for row in rows}) == len(rows)
    assert all("{{NAME}}" in row["response"] or "{{AUTHOR}}" in row["response"] for row in rows)


def test_builtin_set_filled_from_one_value():
    convs = load_dataset("self-cognition", seed=0, name=parse_name_author(["swift-robot"]),
                         author=parse_name_author(["swift"]))
    text = " ".join(answers(convs))
    assert len(convs) >= 100 and "{{" not in text
    assert "我是swift-robot，由swift开发的人工智能助手" in text
    assert "I am swift-robot, an AI assistant developed by swift." in text


def test_builtin_set_filled_per_language_from_two_values():
    convs = load_dataset("swift/self-cognition", seed=0, name=parse_name_author(["小智", "Zhi"]),
                         author=parse_name_author(["魔搭", "ModelScope"]))
    for conv in convs:
        zh = bool(re.search(r"[\u4e00-\u9fff]", conv[0]["content"]))
        answer = conv[-1]["content"]
        assert ("Zhi" not in answer and "ModelScope" not in answer) if zh else ("小智" not in answer and "魔搭" not in answer)
    assert any(a.startswith("我是小智，由魔搭开发的人工智能助手。") for a in answers(convs))
    assert any(a.startswith("I am Zhi, an AI assistant developed by ModelScope.") for a in answers(convs))


def test_builtin_set_samples_with_hash_count():
    name = author = ("n", "n")
    assert len(load_dataset("self-cognition#500", seed=0, name=name, author=author)) == 500


def test_builtin_set_without_name_is_refused():
    with raises(r"the built-in self-cognition data, conversation 1, contains the placeholder \{\{NAME\}\} in an "
                r"answer; pass --model_name \(and --model_author\)"):
        load_dataset("self-cognition", seed=0)
    with raises(r"contains the placeholder \{\{AUTHOR\}\} in an answer; pass --model_author \(and --model_name\)"):
        load_dataset("self-cognition", seed=0, name=("a", "a"))


def test_user_file_with_placeholder_is_refused_or_filled(tmp_path):
    path = str(write_json(tmp_path / "mine.json", [
        {"instruction": "Who are you?", "output": "I am {{NAME}}."},
        {"instruction": "你是谁？", "output": "我是{{NAME}}。"}]))
    with raises(r"mine\.json, conversation 1, contains the placeholder \{\{NAME\}\}"):
        load_dataset(path, seed=0)
    assert answers(load_dataset(path, seed=0, name=("小智", "Zhi"))) == ["I am Zhi.", "我是小智。"]
    with raises(r"^x, conversation 2, contains the placeholder \{\{AUTHOR\}\}"):
        check_no_placeholders([[user("q"), assistant("a")], [user("{{AUTHOR}}"), assistant("by {{AUTHOR}}")]], "x")


def test_parse_name_author():
    assert parse_name_author(None) is None and parse_name_author([]) is None
    assert parse_name_author(["robot"]) == ("robot", "robot")
    assert parse_name_author(["机器人", "robot"]) == ("机器人", "robot")
    with raises(r"take one value, or two \(Chinese first, then English\), but got 3: 'a', 'b', 'c'"):
        parse_name_author(["a", "b", "c"])


def test_held_out_sets_do_not_overlap_training():
    train_queries = {row["query"] for row in self_cognition_rows(None, None)}
    questions = identity_eval_questions()
    langs = Counter(q["lang"] for q in questions)
    assert langs["en"] >= 18 and langs["zh"] >= 18
    assert not train_queries & {q["question"] for q in questions}
    assert {q["expects"] for q in questions} <= {"name", "author", "any"}

    prompts = general_prompts()
    assert len(prompts) >= 28 and {p["lang"] for p in prompts} == {"en", "zh"}
    assert all(p["answer"] is None or (p["answer"] and all(isinstance(a, str) for a in p["answer"])) for p in prompts)
    assert sum(p["answer"] is not None for p in prompts) >= 20

    pool = general_distill_instructions()
    assert len(pool) >= 140 and len(set(pool)) == len(pool)
    assert not set(pool) & {p["prompt"] for p in prompts} and not set(pool) & train_queries
    assert any(re.search(r"[\u4e00-\u9fff]", s) for s in pool) and any(s.isascii() for s in pool)


# --- bad input ---------------------------------------------------------------------------------------------

def test_invalid_json_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "Hi", "output": "Hello"},\n  {"instruction": "Bye" "output": "x"}\n]')
    with raises(r"broken\.json is not valid JSON \(Expecting ',' delimiter at line 3, column 25\)"):
        load_dataset(str(path), seed=0)


def test_invalid_jsonl_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"query": "a", "response": "b"}\n\n{"query": "c", "response": }\n')
    with raises(r"broken\.jsonl line 3 is not valid JSON \(Expecting value at column 28\)"):
        load_dataset(str(path), seed=0)


def test_row_missing_a_field_names_the_file_row_and_field(tmp_path):
    path = write_json(tmp_path / "rows.json", numbered_rows(2) + [{"instruction": "Hi", "input": ""}])
    with raises(r"rows\.json row 3 has no 'output' field; add the answer the model should learn as 'output'\."):
        load_dataset(str(path), seed=0)
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("instruction,output\nHi,Hello\nBye,\n")
    with raises(r"rows\.csv row 2, field 'output' is empty"):
        load_dataset(str(csv_path), seed=0)


@pytest.mark.parametrize("content", ["", "[]", '{"data": []}'])
def test_empty_file_is_refused(tmp_path, content):
    path = tmp_path / "empty.json"
    path.write_text(content)
    with raises(r"dataset '.*empty\.json' has no rows; add rows to it or leave it out of --dataset\."):
        load_dataset(str(path), seed=0)


def test_json_that_is_not_a_list_of_rows(tmp_path):
    path = write_json(tmp_path / "one.json", {"instruction": "Hi", "output": "Hello"})
    with raises(r"one\.json holds a JSON object, not a list of rows"):
        load_dataset(str(path), seed=0)


def test_missing_path_and_empty_folder(tmp_path):
    with raises(r"dataset 'nowhere/self_cognition\.json' does not exist \(looked in .*\); check the path\."):
        load_dataset("nowhere/self_cognition.json#10", seed=0)
    with raises(r"dataset folder '.*' holds no \.json, \.jsonl, \.csv or \.parquet file"):
        load_dataset(str(tmp_path), seed=0)
    with raises(r"no dataset was given"):
        load_datasets([], seed=0)


HUB_REFUSAL = (r"^dataset 'AI-ModelScope/alpaca-gpt4-data-zh' is not a local file or folder, and no dataset hub is "
               r"reachable here; download it and pass the local path \(JSON, JSONL, CSV or Parquet\)\.$")


def test_hub_name_offline_is_refused(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with raises(HUB_REFUSAL):
        load_dataset("AI-ModelScope/alpaca-gpt4-data-zh#500", seed=0)


def test_hub_name_without_a_hub_package_is_refused(monkeypatch):
    for variable in sources.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with raises(HUB_REFUSAL):
        load_dataset("AI-ModelScope/alpaca-gpt4-data-zh#500", seed=0)

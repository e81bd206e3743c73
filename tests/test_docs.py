"""The docs as a user reads and runs them. Every command in README.md and docs/*.md that names one of our CLIs
or scripts is checked against the code: its flags are in the CLI's --help, its NAME=value variables are read by
the script it names, its paths exist. The cheap ones run as written, in a shell without the tests' PYTHONPATH
(conftest's stand-ins): the CLIs' --help, the recipes' DRY_RUN=1, the reward servers' start and /health.
The tiny runs and the rehearsal are run as written by their own real-run tests."""

import configparser
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from openrlhf_gd2po.reward_spec import SPEC_FORMAT
from reward_servers.local import running_process
from test_openrlhf_integration import HELP_FLAGS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHONS = {"python", "python3", ".venv/bin/python", "deepspeed"}
OUR_CODE = ("openrlhf_gd2po", "reward_servers", "examples/", "benchmarks/")
TRAINER = "openrlhf_gd2po.cli.train_gd2po_ray"
# Their extra flags go to train_gd2po_ray (each says so at its top).
TRAINER_WRAPPERS = {f"examples/scripts/{name}" for name in
                    ("train_tiny_cpu.sh", "train_smollm2_cpu.sh", "train_toolcall_gd2po.sh", "train_safety_gd2po.sh")}
ALIASES = {"examples/scripts/train_gd2po_ray.py": TRAINER}  # a three-line wrapper of the module's main
READ_OUTSIDE_OUR_CODE = {"CUDA_VISIBLE_DEVICES"}  # read by CUDA itself
REPO_PATH = re.compile(r"(?:examples|benchmarks|tests|docs|openrlhf_gd2po|reward_servers)/[\w./-]*[\w/]")


def user_env():
    """A user's shell after install_cpu.sh: the project's bin first on PATH, no PYTHONPATH (the tests'
    stand-ins are there). `python -m` from the checkout imports the checkout, as the editable install does."""
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "GD2PO_REWARD_API_KEY")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def shell_lines(text):
    """The command lines of a page: each line of a ```bash block (continuations joined), and inline code
    outside the blocks that starts like a command."""
    for block in re.findall(r"^ *```bash\n(.*?)^ *```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                yield line.strip()
    for code in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        words = code.split()
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words.pop(0)
        if words and (words[0] in PYTHONS | {"bash", "ray"} or Path(words[0]).name.startswith("gd2po-")):
            yield code


def without_comment(line):
    """The line up to a '#' that starts a word outside quotes, as bash reads it (url#dimension is no comment)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def split_words(line):
    """The simple commands of a line: lists of words, split at &&, ||, |, ; and &."""
    lexer = shlex.shlex(without_comment(line), posix=True, punctuation_chars="&|;")
    lexer.whitespace_split, lexer.commenters = True, ""
    words = list(lexer)
    command = []
    for word in words:
        if word and set(word) <= set("&|;"):
            yield command
            command = []
        else:
            command.append(word)
    yield command


class Command:
    """One simple command of ours: its NAME=value variables, the CLI it runs (a module, a module with a
    reward_servers task, or a repo path) and its arguments."""

    def __init__(self, page, line, env, target, args):
        self.page, self.line, self.env, self.target, self.args = page, line, env, target, args

    @property
    def cli(self):
        """What `--help` to read this command's flags from."""
        if self.target.endswith(".sh"):
            return TRAINER if self.target in TRAINER_WRAPPERS else None
        if self.target == "reward_servers" and self.args and not self.args[0].startswith("-"):
            return f"reward_servers {self.args[0]}"
        return ALIASES.get(self.target, self.target)


def parse(page, line, words):
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if not words:
        return None
    if words[0] == "ray" and "--" in words:  # ray job submit ... -- ENTRYPOINT
        return parse(page, line, words[words.index("--") + 1 :])
    program = Path(words[0]).name
    if words[0] in PYTHONS and len(words) > 2 and words[1] == "-m":
        target, args = words[2], words[3:]
    elif words[0] in PYTHONS | {"bash"} and len(words) > 1 and words[1].endswith((".py", ".sh")):
        target, args = words[1], words[2:]
    elif program.startswith("gd2po-"):
        target, args = CONSOLE_SCRIPTS.get(program, program), words[1:]
    else:
        return None
    return Command(page, line, env, target, args) if target.startswith(OUR_CODE) else None


def read_console_scripts():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    entries = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return {name.strip(): value.split(":")[0].strip().removesuffix(".__main__")
            for name, value in (entry.split("=", 1) for entry in entries)}


CONSOLE_SCRIPTS = read_console_scripts()


def doc_commands():
    commands = []
    for page in PAGES:
        for line in shell_lines(page.read_text()):
            for words in split_words(line):
                command = parse(page, line, words)
                if command is not None:
                    commands.append(command)
    return commands


def help_command(cli):
    if cli.endswith(".py"):
        return [sys.executable, cli, "--help"]
    return [sys.executable, "-m", *cli.split(), "--help"]


@pytest.fixture(scope="module")
def commands():
    found = doc_commands()
    assert len(found) > 20, "the docs' commands were not found"
    return found


@pytest.fixture(scope="module")
def helps(commands):
    """Each CLI's --help, run once, side by side, in a user's shell (train_gd2po_ray's too, on a machine
    without flash-attn)."""
    clis = sorted({c.cli for c in commands if c.cli} | {TRAINER})
    env = user_env()

    def run(cli):
        return subprocess.run(help_command(cli), env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)

    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(clis, pool.map(run, clis)))
    return {cli: r.stdout if r.returncode == 0 else f"FAILED: {r.stderr[-1000:]}" for cli, r in results.items()}


def variables_read_by(target):
    """The source a command's variables may be read in: a script and the repo scripts it names (sources,
    execs), transitively; for a module or a Python script, also our packages."""
    files, todo = [], [ROOT / target] if "/" in target else []
    while todo:
        path = todo.pop()
        if path in files or not path.is_file():
            continue
        files.append(path)
        todo += [ROOT / name for name in re.findall(r"examples/scripts/[\w.]+\.(?:sh|py)", path.read_text())]
    if not target.endswith(".sh"):
        files += [p for package in ("openrlhf_gd2po", "reward_servers") for p in (ROOT / package).rglob("*.py")]
    return "\n".join(path.read_text() for path in files)


def test_every_doc_command_names_real_flags_variables_and_paths(commands, helps):
    problems = []
    for command in commands:
        where = f"{command.page.relative_to(ROOT)}: `{command.line}`"
        if "/" in command.target and not (ROOT / command.target).is_file():
            problems.append(f"{where}: {command.target} does not exist")
            continue
        if command.cli and helps[command.cli].startswith("FAILED"):
            problems.append(f"{where}: `{command.cli} --help` {helps[command.cli]}")
        elif command.cli:
            flags = set(re.findall(r"(?<![\w-])--[A-Za-z][\w.-]*", helps[command.cli]))
            for word in command.args:
                flag = word.split("=", 1)[0].lstrip("[")
                if flag.startswith("--") and flag not in flags:
                    problems.append(f"{where}: {command.cli} has no flag {flag}")
        elif any(word.startswith("--") for word in command.args):
            problems.append(f"{where}: {command.target} takes no flags")
        source = variables_read_by(command.target)
        for name in command.env:
            if name not in READ_OUTSIDE_OUR_CODE and not re.search(rf"\b{name}\b", source):
                problems.append(f"{where}: {name} is read by neither {command.target} nor what it runs")
        for word in command.args:
            for path in REPO_PATH.findall(word):
                if not (ROOT / path).exists():
                    problems.append(f"{where}: {path} does not exist")
    assert not problems, "\n".join(problems)


def anchors(page):
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_and_named_files_exist():
    problems = []
    for page in PAGES:
        text = page.read_text()
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if link.startswith("http"):
                continue
            path, _, anchor = link.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                problems.append(f"{page.name}: link {link}: no such file")
            elif anchor and anchor not in anchors(linked):
                problems.append(f"{page.name}: link {link}: no such heading")
        for code in re.findall(r"`([^`\n]+)`", text):
            for path in REPO_PATH.findall(code):
                if "/" in path and not (ROOT / path).exists():
                    problems.append(f"{page.name}: `{code}` names {path}, which does not exist")
    assert not problems, "\n".join(problems)


def test_the_trainers_help_lists_our_flags(helps):
    assert [flag for flag in HELP_FLAGS if flag not in helps[TRAINER]] == []


def test_the_reward_servers_flag_shows_every_target_form(helps):
    # The forms the parser takes (its own error message lists them): a URL, replicas, Serve, a reward file.
    forms = ["http://", "|", "serve:", ".py"]
    assert all(form in SPEC_FORMAT for form in forms)
    usage = re.sub(r"\n\s*", "", helps[TRAINER].split("--reward.servers REWARD.SERVERS\n", 1)[1].split("\n  --", 1)[0])
    assert [form for form in forms if form not in usage] == [], f"train_gd2po_ray --help, --reward.servers: {usage}"
    rows = [line for page in PAGES for line in page.read_text().splitlines() if line.startswith("| `--reward.servers` |")]
    assert len(rows) == 1, "the flag's row is in one place"
    assert [form for form in forms if form not in rows[0].replace("\\|", "|")] == [], f"the docs' row: {rows[0]}"


def test_the_recipes_dry_run_as_written(commands, tmp_path):
    """Each DRY_RUN=1 recipe command of the docs, with its placeholders (…) and missing inputs made up."""
    recipes = [c for c in commands if c.env.get("DRY_RUN") == "1" and c.target.startswith("examples/scripts/train_")]
    assert {c.target for c in recipes} == {"examples/scripts/train_toolcall_gd2po.sh", "examples/scripts/train_safety_gd2po.sh"}
    (tmp_path / "model").mkdir()
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi", "label": ""}\n')

    def run(command):
        made_up = {name: str(tmp_path / ("prompts.jsonl" if name == "DATA" else "model"))
                   for name, value in command.env.items()
                   if name in ("DATA", "MODEL_PATH", "REWARD_MODEL_PATH", "COST_MODEL_PATH") and not (ROOT / value).exists()}
        env = user_env() | command.env | made_up | {"SAVE_PATH": str(tmp_path / "out")}
        return subprocess.run(["bash", command.target, *command.args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        for command, result in zip(recipes, pool.map(run, recipes)):
            assert result.returncode == 0, f"{command.line}:\n{result.stderr}"
            assert "DRY_RUN=1: nothing was launched." in result.stdout
            assert not (tmp_path / "out").exists()


def test_the_reward_servers_start_as_written(commands):
    """The docs' CPU reward servers on this machine: started as written (on a free port: the one written
    may be taken), /health answers 200, SIGTERM stops them."""
    servers = [c for c in commands if c.target == "reward_servers" and c.args[:1] in (["toolcall"], ["math"], ["length"])
               and not {"--help", "--ray-serve", "--host"} & set(c.args)]
    assert len(servers) >= 2

    def start_and_check(command):
        with running_process([sys.executable, "-m", "reward_servers", *command.args], user_env() | command.env) as (url, _):
            with urllib.request.urlopen(f"{url}/health", timeout=10) as answer:
                return answer.status, json.loads(urllib.request.urlopen(f"{url}/info", timeout=10).read())

    with ThreadPoolExecutor(len(servers)) as pool:
        for command, (status, info) in zip(servers, pool.map(start_and_check, servers)):
            assert status == 200, command.line
            assert info, command.line

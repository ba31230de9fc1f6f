"""Pushing a run to the Hub (prefopt.hub): `push_to_hub: true` at the end of a run and `prefopt push
OUTPUT_DIR --repo_id ID` afterwards, against a stand-in of the Hub's HTTP API on 127.0.0.1 (no
network): huggingface_hub's own create_repo and upload_folder talk to it, and the test reads what
arrived. The stand-in answers every file as a regular (in-commit) upload, so the LFS/Xet transfer
the real Hub asks for large files is not exercised; everything before it is."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub.constants
import pytest
import yaml

from prefopt.cli import main
from prefopt.config import build_config
from prefopt.errors import PrefoptError
from prefopt.hub import push
from prefopt.pipeline import train


class FakeHub(BaseHTTPRequestHandler):
    """The endpoints create_repo and upload_folder call (the repository, the README's metadata check,
    the upload modes, the commit) and create_branch's; 401 for a token other than hf_good."""

    server: "HubServer"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") == "chunked":
            data = b""
            while size := int(self.rfile.readline().strip(), 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, code: int, payload: dict):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 (http.server's name)
        hub, body, path = self.server, self._body(), self.path.split("?")[0]
        hub.requests.append((path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != "Bearer hf_good":
            return self._answer(401, {"error": "Invalid credentials in Authorization header"})
        if path == "/api/validate-yaml":  # the client has the Hub check a README.md's header before a commit
            d = json.loads(body)
            header = yaml.safe_load(d["content"].split("---\n")[1])
            hub.validated.append(header)
            if not isinstance(header, dict) or not isinstance(header.get("tags", []), list):
                return self._answer(400, {"error": "Invalid metadata in README.md"})
            return self._answer(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create":
            d = json.loads(body)
            hub.created.append(d)
            return self._answer(200, {"url": f"{hub.url}/{d['organization'] or 'me'}/{d['name']}"})
        repo, _, rest = path.removeprefix("/api/models/").partition("/")
        repo = f"{repo}/{rest.split('/')[0]}"
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._answer(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                for f in files]})
        if "/branch/" in path:
            hub.branches.append(path.rsplit("/", 1)[1])
            return self._answer(200, {})
        if "/commit/" in path:
            lines = [json.loads(x) for x in body.decode().splitlines()]
            files = {e["value"]["path"]: base64.b64decode(e["value"]["content"]) for e in lines if e["key"] == "file"}
            hub.commits.append({"repo": repo, "revision": path.rsplit("/", 1)[1], "files": files})
            return self._answer(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        return self._answer(404, {"error": f"the stand-in does not answer {path}"})

    def log_message(self, *args):
        pass


class HubServer(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeHub)
        self.url = f"http://127.0.0.1:{self.server_port}"
        self.requests, self.created, self.branches, self.commits, self.validated = [], [], [], [], []


@pytest.fixture
def hub(monkeypatch):
    server = HubServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)  # HfApi() reads it when built
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def ws(workspace):
    return workspace("push", {"train": (8, 0), "test": (4, 1)}, chat=True, method="simpo", learning_rate=5e-3,
                     seed=3, max_steps=2, per_device_train_batch_size=4, logging_steps=1, save_steps=1,
                     report_to="none")


# what a full model's run uploads; never its bookkeeping, pickles, checkpoints or the user's files
UPLOADED = {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "prefopt_config.yaml", "data_report.json",
            "metrics.jsonl", "prefopt_provenance.json"}


def test_push_to_hub_uploads_the_run_once_at_its_end(ws, hub, tmp_path):
    out = tmp_path / "tiny-simpo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = build_config({**ws.config, "output_dir": str(out), "push_to_hub": True, "hub_model_id": "org/tiny-simpo",
                        "hub_private_repo": True, "hub_strategy": "checkpoint"})
    said = []
    train(cfg, log=said.append)
    assert cfg.training.push_to_hub  # put back after the run
    # one repository created, one commit: the Trainer pushed nothing (not at its start, not its checkpoints)
    assert [p for p, _ in hub.requests] == ["/api/repos/create", "/api/validate-yaml",
                                            "/api/models/org/tiny-simpo/preupload/main",
                                            "/api/models/org/tiny-simpo/commit/main"]
    assert hub.validated[0]["library_name"] == "prefopt" and "simpo" in hub.validated[0]["tags"]
    assert hub.created == [{"name": "tiny-simpo", "organization": "org", "visibility": "private"}]
    (commit,) = hub.commits
    names = set(commit["files"])
    plots = {n for n in names if n.startswith("plots/")}
    assert names - plots == UPLOADED and plots == {f"plots/{p.name}" for p in (out / "plots").glob("*.png")}
    assert plots
    for name in names:
        assert commit["files"][name] == (out / name).read_bytes(), name
    # the card names the repository it was pushed to
    assert 'from_pretrained("org/tiny-simpo")' in commit["files"]["README.md"].decode()
    assert any("checkpoints" in line for line in said)  # hub_strategy checkpoint: said, read as the end
    assert any(line.startswith("prefopt: pushed") and "org/tiny-simpo" in line for line in said)


def test_prefopt_push_and_its_refusals(ws, hub, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    train(build_config({**ws.config, "output_dir": str(out), "use_peft": True, "lora_r": 4, "lora_alpha": 8}),
          log=lambda *a: None)
    assert hub.requests == []
    assert main(["push", str(out), "--repo_id", "adapter-x", "--revision", "v1", "--private", "false"]) == 0
    assert hub.created == [{"name": "adapter-x", "organization": None, "visibility": "public"}]
    assert hub.branches == ["v1"]
    (commit,) = hub.commits
    assert commit["repo"] == "me/adapter-x" and commit["revision"] == "v1"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(commit["files"])
    assert "model.safetensors" not in commit["files"]
    assert 'from_pretrained("me/adapter-x")' in (out / "README.md").read_text()  # the card, rendered again
    # refused before anything is sent
    capsys.readouterr()
    sent = len(hub.requests)
    assert main(["push", str(tmp_path / "nowhere"), "--repo_id", "a/b"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["push", str(ws.model), "--repo_id", "a/b"]) == 2
    assert "holds no prefopt run" in capsys.readouterr().err
    assert main(["push", str(out), "--repo_id", "a/b/c"]) == 2
    assert "is not a repository name" in capsys.readouterr().err
    assert main(["push", str(out)]) == 2
    assert "--repo_id" in capsys.readouterr().err
    assert len(hub.requests) == sent
    # the Hub's refusal: one line naming the repository and the fix
    with pytest.raises(PrefoptError, match="the Hub refused org/x: .*401.*Check the token"):
        push(out, "org/x", token="hf_bad", log=lambda *a: None)
    # no Hub to reach (a closed port)
    closed = HubServer()
    port = closed.server_port
    closed.server_close()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(PrefoptError, match="could not reach the Hub for org/x: .*push it later with `prefopt push"):
        push(out, "org/x", log=lambda *a: None)
    assert main(["push", "--help"]) == 0
    assert "--repo_id ID" in capsys.readouterr().out


def test_an_unfinished_run_is_not_pushed(ws, hub, tmp_path):
    out = tmp_path / "run"
    train(build_config({**ws.config, "output_dir": str(out)}), log=lambda *a: None)
    record = json.loads((out / "prefopt_run.json").read_text())
    record["finished"] = None
    (out / "prefopt_run.json").write_text(json.dumps(record))
    with pytest.raises(PrefoptError, match="has not finished"):
        push(out, "org/x", log=lambda *a: None)
    assert hub.requests == []


def test_a_failed_push_fails_the_command_not_the_run(ws, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_bad")
    out = tmp_path / "run"
    cfg = build_config({**ws.config, "output_dir": str(out), "push_to_hub": True, "hub_model_id": "org/x"})
    with pytest.raises(PrefoptError, match=rf"the run finished and is saved in {out}, but pushing it failed: .*401"):
        train(cfg, log=lambda *a: None)
    assert json.loads((out / "prefopt_run.json").read_text())["finished"] == {"step": 2}
    assert hub.commits == [] and [p for p, _ in hub.requests] == ["/api/repos/create"]

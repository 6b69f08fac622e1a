"""``mtflow export --model_card_only`` / ``--push_to_hub``: the model card's content, and the upload through
``huggingface_hub``'s own API with only the network replaced (an httpx transport answering as the Hub does)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from mtflow.cli import main
from mtflow.testing.fixtures import tiny_fit_config, write_config, write_random_manifest

REPO = "someone/tiny-kontext-multiturn"


@pytest.fixture(scope="module")
def run(tiny_kontext_path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    manifest = write_random_manifest(root / "data", num_chains=4, num_turns=2)
    config = tiny_fit_config(tiny_kontext_path, manifest, root, model={"optim": {"lr": 0.05}}, name="run")
    config["data"]["init_args"]["val_manifest"] = str(manifest)
    config["heldout"] = {"num_chains": 2, "batch_size": 2}
    main(["fit", "--config", str(write_config(config, root / "run.yaml"))])
    return root / "run" / "version_0"


def _export(run: Path, out: Path, *extra: str) -> None:
    # the run's own saved config.yaml (it carries fit's weights_only: null)
    main(["export", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--output_dir", str(out), *extra])  # fmt: skip


def test_model_card_names_the_base_lora_config_table_grid_and_loading_snippet(run, tmp_path):
    from huggingface_hub import ModelCard

    from mtflow.checkpoints import read_checkpoint

    _export(run, tmp_path / "card", "--model_card_only", "true")
    assert not (tmp_path / "card" / "pytorch_lora_weights.safetensors").exists()  # the card only
    card = ModelCard.load(tmp_path / "card" / "README.md")
    info = read_checkpoint(run / "checkpoints/last.ckpt")["mtflow"]
    assert card.data.library_name == "diffusers" and "mtflow" in card.data.tags
    text = card.text
    assert f"| base model | `{info['pretrained']}` |" in text
    assert "| LoRA rank | 4 |" in text and "| LoRA alpha | 8.0 |" in text
    assert "| LoRA targets | " + ", ".join(f"`{t}`" for t in info["lora"]["targets"]) + " |" in text
    assert f"| RL iterations | {info['iteration']} |" in text
    assert (run / "eval" / "before_after.md").read_text().strip() in text  # the held-out table, verbatim
    assert "![" in text and "](chains.png)" in text
    assert (tmp_path / "card" / "chains.png").read_bytes() == (run / "eval" / "chains.png").read_bytes()
    config = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config["model"]["policy"]["init_args"]["lora_rank"] == 4 and "weights_only" not in config
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    compile(snippet, "snippet", "exec")  # valid Python
    assert f'FluxKontextPipeline.from_pretrained("{info["pretrained"]}"' in snippet
    assert 'load_lora_weights("path/to/folder", weight_name="pytorch_lora_weights.safetensors")' in snippet


class FakeHub:
    """The Hub's HTTP API as ``HfApi.create_repo`` and ``upload_folder`` use it; everything else is a 404 that
    the test reports."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.commits: list[list[dict]] = []
        self.authorization: set[tuple[str, str]] = set()
        self.validated: list[dict] = []

    def __call__(self, request):
        import httpx2

        path = request.url.path
        self.requests.append((request.method, path))
        self.authorization.add((path, request.headers.get("authorization", "")))
        if request.method == "POST" and path == "/api/repos/create":
            self.created.append(json.loads(request.content))
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{REPO}", "name": REPO})
        if (
            request.method == "POST" and path == "/api/validate-yaml"
        ):  # upload_folder has the card's metadata checked
            self.validated.append(json.loads(request.content))
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if request.method == "POST" and path == f"/api/models/{REPO}/preupload/main":
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200,
                json={
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                },
            )
        if request.method == "POST" and path == f"/api/models/{REPO}/commit/main":
            self.commits.append([json.loads(line) for line in request.content.decode().splitlines() if line])
            return httpx2.Response(
                200,
                json={
                    "commitUrl": f"https://huggingface.co/{REPO}/commit/{'a' * 40}",
                    "commitOid": "a" * 40,
                    "success": True,
                },
            )
        return httpx2.Response(404, json={"error": f"fake hub: no route {request.method} {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("MY_HUB_TOKEN", "hf_secret_for_test")
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    yield hub
    _http.set_client_factory(_http.default_client_factory)


def test_push_to_hub_uploads_lora_card_and_grid_through_huggingface_hub(run, tmp_path, fake_hub):
    out = tmp_path / "lora"
    _export(run, out, "--push_to_hub", REPO, "--hub_token_env", "MY_HUB_TOKEN")
    created = fake_hub.created[0]
    assert (created["organization"], created["name"], created.get("visibility", created.get("private"))) in (
        ("someone", "tiny-kontext-multiturn", "private"),
        ("someone", "tiny-kontext-multiturn", True),
    )
    assert len(fake_hub.commits) == 1
    header, *operations = fake_hub.commits[0]
    assert header["key"] == "header" and header["value"]["summary"] == "mtflow: LoRA and model card"
    uploaded = {
        op["value"]["path"]: base64.b64decode(op["value"]["content"])
        for op in operations
        if op["key"] == "file"
    }
    assert set(uploaded) == {"README.md", "chains.png", "pytorch_lora_weights.safetensors"}
    for name, content in uploaded.items():
        assert content == (out / name).read_bytes(), name
    assert f'load_lora_weights("{REPO}"' in uploaded["README.md"].decode()
    writes = {"/api/repos/create", f"/api/models/{REPO}/preupload/main", f"/api/models/{REPO}/commit/main"}
    sent = {path: auth for path, auth in fake_hub.authorization if path in writes}
    assert sent == dict.fromkeys(writes, "Bearer hf_secret_for_test"), fake_hub.authorization
    assert "library_name: diffusers" in json.dumps(fake_hub.validated[0])
    for path in out.iterdir():  # the token never reaches a file
        assert b"hf_secret_for_test" not in path.read_bytes()

    _export(
        run,
        tmp_path / "card",
        "--push_to_hub",
        REPO,
        "--model_card_only",
        "true",
        "--hub_token_env",
        "MY_HUB_TOKEN",
    )
    header, *operations = fake_hub.commits[1]
    assert header["value"]["summary"] == "mtflow: model card"
    assert {op["value"]["path"] for op in operations if op["key"] == "file"} == {"README.md", "chains.png"}

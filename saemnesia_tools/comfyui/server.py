"""A real ComfyUI server driven over HTTP (the demo, the UI launcher and the end-to-end tests use it):
`main.py --cpu` on a free loopback port, with this pack as its only custom node and its own base directory
(models, input, output, user), so it never touches a real install. The nodes never import this module.

    python -m saemnesia_tools.comfyui.server [--port 8188]     # ComfyUI with the pack, until Ctrl-C (scripts/comfyui.sh)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

from saemnesia_tools.testing import free_port

from .host import REPO_ROOT, comfyui_path


class ComfyServer:
    """A ComfyUI process on loopback with its own base folder; `start()` waits until the pack's nodes answer."""

    def __init__(self, base: Path, port: int | None = None, comfy_root: Path | None = None,
                 front_end_root: Path | None = None):
        """front_end_root: a frontend's static folder to serve instead of the host's own (`--front-end-root`)."""
        self.comfy_root, self.base = Path(comfy_root or comfyui_path()), Path(base)
        self.front_end_root = front_end_root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.proc = None
        for sub in ("custom_nodes", "models/saemnesia", "input", "output", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "saemnesia"
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)

    def start(self, timeout: float = 180) -> "ComfyServer":
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--use-pytorch-cross-attention",
               "--preview-method", "none"]
        if self.front_end_root:
            cmd += ["--front-end-root", str(self.front_end_root)]
        self.log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_root, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/object_info/SAEmnesiaEraseConcepts", timeout=5).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc:
            self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=60, **kw)

    def queue(self, prompt: dict) -> str:
        r = requests.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": uuid.uuid4().hex}, timeout=60)
        if not r.ok:
            raise AssertionError(f"/prompt refused the prompt ({r.status_code}): {r.text}")
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}").json()
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def images(self, entry: dict, node_id: str) -> list[bytes]:
        """The PNG bytes a SaveImage node of a finished prompt wrote, through the server's /view."""
        out = []
        for img in entry["outputs"][node_id]["images"]:
            r = self.get("/view", params={"filename": img["filename"], "subfolder": img["subfolder"],
                                          "type": img["type"]})
            r.raise_for_status()
            out.append(r.content)
        return out

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through main's `finally`, which stops ComfyUI


def main(argv=None) -> int:
    """Run ComfyUI with the pack in the foreground until Ctrl-C or SIGTERM (scripts/comfyui.sh); either stops the
    ComfyUI child and waits for it, so a process manager stopping this wrapper leaves no server behind."""
    import argparse

    p = argparse.ArgumentParser(description="ComfyUI with the SAEmnesia pack, on loopback")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--base", type=Path, default=REPO_ROOT / "output" / "comfyui_ui",
                   help="ComfyUI base directory (models, input, output, user); the pack's toy assets are always there")
    args = p.parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    server = ComfyServer(args.base, args.port)
    try:
        server.start()
        print(f"ComfyUI with SAEmnesia: {server.url}  (log: {server.log_path}; Ctrl-C stops it)", flush=True)
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # a second signal must not cut the stop short
            signal.signal(signum, signal.SIG_IGN)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

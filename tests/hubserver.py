"""A small stand-in for the Hugging Face Hub, for tests: the real `huggingface_hub` client (and
transformers' `from_pretrained`) talk to it on 127.0.0.1 through `HF_ENDPOINT`.

It implements the commit protocol with the classic LFS transfer (run the client with
`HF_HUB_DISABLE_XET=1`) and records every request it receives, so tests assert on what was sent:

    POST /api/repos/create                            create (409 + {"url"} if it exists)
    POST /api/validate-yaml                           YAML front matter must parse
    GET  /api/whoami-v2
    GET  /api/models/{ns}/{name}[/revision/{rev}]     repo info (siblings, sha)
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]  file listing (oid, size, lfs)
    POST /api/models/{ns}/{name}/preupload/{rev}      upload mode: lfs for weights, else regular
    POST /api/models/{ns}/{name}/commit/{rev}         NDJSON header/file/lfsFile/deletedFile lines
    POST /api/models/{ns}/{name}/branch/{branch}      create a branch (409 if it exists)
    POST /{ns}/{name}.git/info/lfs/objects/batch      LFS batch: upload + verify hrefs
    PUT  /lfs-upload/{oid}    POST /lfs-verify/{oid}  the LFS object store
    HEAD/GET /{ns}/{name}/resolve/{rev}/{path}        download (ETag, X-Repo-Commit)
    POST /api/collections  GET /api/collections/{slug}  POST /api/collections/{slug}/items
    GET  /api/agent-harnesses                         404 (the client's best-effort probe)

Anything else is answered 404 and recorded with `handled=False`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "halos-tester"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
NOW = "2026-01-01T00:00:00.000Z"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        """What git stores: the blob itself, or for LFS files the pointer file."""
        if not self.lfs:
            return git_blob_sha1(self.data)
        pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                   f"size {len(self.data)}\n").encode()
        return git_blob_sha1(pointer)


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        sha = self.branches.get(rev, rev)
        return self.commits.get(sha)

    def commit(self, branch: str, message: str, files: dict[str, Blob]) -> Commit:
        parent = self.branches.get(branch)
        seed = f"{self.repo_id}\0{parent}\0{message}\0{len(self.commits)}".encode()
        sha = hashlib.sha1(seed + b"".join(p.encode() + b.data for p, b in files.items())).hexdigest()
        self.commits[sha] = Commit(sha, parent, message, dict(files))
        self.branches[branch] = sha
        return self.commits[sha]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    status: int = 0
    handled: bool = True

    def json(self) -> Any:
        return json.loads(self.body)


class FakeHub:
    """The state (repos, LFS objects, collections) and the request log of one test server."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.collections: dict[str, dict] = {}
        self.requests: list[Request] = []
        self.committed_files: list[tuple[str, str, bytes]] = []  # (repo, path, content) as received
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------------------------- queries
    def calls(self, method: str, pattern: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    def files(self, repo_id: str, rev: str = "main") -> dict[str, Blob]:
        commit = self.repos[repo_id].resolve(rev)
        return {} if commit is None else commit.files

    def received_bytes(self) -> list[bytes]:
        """Every request body plus every committed file decoded from its base64 line."""
        return [r.body for r in self.requests] + [c for _, _, c in self.committed_files]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # --------------------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        req = Request(method, unquote(parts.path), parse_qs(parts.query), {k.lower(): v for k, v in self.headers.items()},
                      self._body())
        with self.hub.lock:
            self.hub.requests.append(req)
            for verb, pattern, handler in ROUTES:
                match = re.fullmatch(pattern, req.path)
                if match and (verb == method or (verb, method) == ("GET", "HEAD")):
                    status, headers, body = handler(self.hub, req, **match.groupdict())
                    break
            else:
                req.handled = False
                status, headers, body = 404, {}, b'{"error": "not implemented by the test hub"}'
        req.status = status
        self._reply(status, headers, body, head=method == "HEAD")

    def _reply(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


# ------------------------------------------------------------------------------------ handlers
Reply = tuple[int, dict[str, str], bytes]


def _json(obj: Any, status: int = 200, **headers: str) -> Reply:
    return status, dict(headers), json.dumps(obj).encode()


def _error(status: int, code: str, message: str) -> Reply:
    return _json({"error": message}, status, **{"X-Error-Code": code, "X-Error-Message": message})


def _authorized(hub: FakeHub, req: Request) -> bool:
    return req.headers.get("authorization") == f"Bearer {hub.token}"


def _repo(hub: FakeHub, req: Request, repo_id: str) -> Repo | Reply:
    repo = hub.repos.get(repo_id)
    if repo is None or (repo.private and not _authorized(hub, req)):
        return _error(404, "RepoNotFound", f"Repository not found: {repo_id}")
    return repo


def _commit(hub: FakeHub, req: Request, repo_id: str, rev: str) -> tuple[Repo, Commit] | Reply:
    repo = _repo(hub, req, repo_id)
    if not isinstance(repo, Repo):
        return repo
    commit = repo.resolve(rev)
    if commit is None:
        return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
    return repo, commit


def create_repo(hub: FakeHub, req: Request) -> Reply:
    if not _authorized(hub, req):
        return _error(401, "Unauthorized", "Invalid credentials in Authorization header")
    payload = req.json()
    repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
    url = f"{hub.url}/{repo_id}"
    if repo_id in hub.repos:
        return _json({"error": "You already created this model repo", "url": url}, 409)
    repo = hub.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
    repo.commit("main", "initial commit", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)})
    return _json({"url": url, "name": repo_id})


def validate_yaml(hub: FakeHub, req: Request) -> Reply:
    content = req.json().get("content", "")
    match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else {}
    except yaml.YAMLError as err:
        return _json({"error": f"Invalid metadata in README.md: {err}"}, 400)
    if not isinstance(meta, dict):
        return _json({"error": "Invalid metadata in README.md: not a mapping"}, 400)
    return _json({"errors": [], "warnings": []})


def whoami(hub: FakeHub, req: Request) -> Reply:
    if not _authorized(hub, req):
        return _error(401, "Unauthorized", "Invalid credentials in Authorization header")
    return _json({"type": "user", "name": USER, "orgs": [], "auth": {}})


def repo_info(hub: FakeHub, req: Request, repo_id: str, rev: str = "main") -> Reply:
    found = _commit(hub, req, repo_id, rev)
    if not isinstance(found[0], Repo):
        return found
    repo, commit = found
    blobs = "blobs" in req.query
    siblings = [{"rfilename": path, **(_sibling(blob) if blobs else {})}
                for path, blob in sorted(commit.files.items())]
    return _json({"id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": repo.private,
                  "lastModified": NOW, "createdAt": NOW, "tags": [], "siblings": siblings,
                  "author": repo_id.split("/")[0], "disabled": False, "gated": False})


def _sibling(blob: Blob) -> dict:
    lfs = {"sha256": blob.sha256, "size": len(blob.data), "pointerSize": 134} if blob.lfs else None
    return {"size": len(blob.data), "blobId": blob.oid, **({"lfs": lfs} if lfs else {})}


def _entry(path: str, blob: Blob) -> dict:
    entry: dict[str, Any] = {"type": "file", "path": path, "oid": blob.oid, "size": len(blob.data)}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
    return entry


def tree(hub: FakeHub, req: Request, repo_id: str, rev: str, path: str | None = None) -> Reply:
    found = _commit(hub, req, repo_id, rev)
    if not isinstance(found[0], Repo):
        return found
    prefix = f"{path.strip('/')}/" if path else ""
    files = {p: b for p, b in sorted(found[1].files.items()) if p.startswith(prefix)}
    if prefix and not files:
        return _error(404, "EntryNotFound", f"{path} does not exist on {rev}")
    recursive = req.query.get("recursive", ["False"])[0].lower() == "true"
    entries, folders = [], set()
    for name, blob in files.items():
        rest = name[len(prefix):]
        if "/" in rest and not recursive:
            folders.add(prefix + rest.split("/")[0])
        else:
            entries.append(_entry(name, blob))
    entries += [{"type": "directory", "path": p, "oid": "0" * 40} for p in sorted(folders)]
    return _json(entries)


def preupload(hub: FakeHub, req: Request, repo_id: str, rev: str) -> Reply:
    if not _authorized(hub, req):
        return _error(401, "Unauthorized", "Invalid credentials in Authorization header")
    found = _commit(hub, req, repo_id, rev)
    current = found[1].files if isinstance(found[0], Repo) else {}
    files = []
    for item in req.json()["files"]:
        lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] > 10 * 2**20
        old = current.get(item["path"])
        files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                      "shouldIgnore": False, "oid": old.oid if old and not lfs else None})
    return _json({"files": files, "commitOid": found[1].sha if isinstance(found[0], Repo) else None})


def commit(hub: FakeHub, req: Request, repo_id: str, rev: str) -> Reply:
    if not _authorized(hub, req):
        return _error(401, "Unauthorized", "Invalid credentials in Authorization header")
    found = _commit(hub, req, repo_id, rev)
    if not isinstance(found[0], Repo):
        return found
    repo, head = found
    lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
    header = lines[0]["value"]
    if header.get("parentCommit") not in (None, head.sha):
        return _json({"error": "A commit has happened since. Please refresh and try again."}, 412)
    files = dict(head.files)
    for line in lines[1:]:
        key, value = line["key"], line["value"]
        if key == "file":
            data = base64.b64decode(value["content"])
            hub.committed_files.append((repo_id, value["path"], data))
            files[value["path"]] = Blob(data, lfs=False)
        elif key == "lfsFile":
            if value["oid"] not in hub.lfs:
                return _json({"error": f"LFS object {value['oid']} not uploaded"}, 422)
            files[value["path"]] = Blob(hub.lfs[value["oid"]], lfs=True)
        elif key == "deletedFile":
            if files.pop(value["path"], None) is None:
                return _error(404, "EntryNotFound", "A file with this name doesn't exist")
        elif key == "deletedFolder":
            files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
    new = repo.commit(rev, header["summary"], files)
    return _json({"success": True, "commitOid": new.sha, "commitUrl": f"{hub.url}/{repo_id}/commit/{new.sha}",
                  "hookOutput": "", "pullRequestUrl": None})


def create_branch(hub: FakeHub, req: Request, repo_id: str, branch: str) -> Reply:
    if not _authorized(hub, req):
        return _error(401, "Unauthorized", "Invalid credentials in Authorization header")
    repo = _repo(hub, req, repo_id)
    if not isinstance(repo, Repo):
        return repo
    if branch in repo.branches:
        return _json({"error": f"Reference already exists: refs/heads/{branch}"}, 409)
    start = repo.resolve(req.json().get("startingPoint") or "main") if req.body else repo.resolve("main")
    if start is None:
        return _error(404, "RevisionNotFound", "Invalid starting point")
    repo.branches[branch] = start.sha
    return _json({})


def lfs_batch(hub: FakeHub, req: Request, repo_id: str) -> Reply:
    if not _authorized(hub, req):
        return _error(401, "Unauthorized", "Invalid credentials in Authorization header")
    objects = []
    for obj in req.json()["objects"]:
        entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
        if obj["oid"] not in hub.lfs:
            entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"},
                                "verify": {"href": f"{hub.url}/lfs-verify/{obj['oid']}"}}
        objects.append(entry)
    return _json({"transfer": "basic", "objects": objects},
                 **{"Content-Type": "application/vnd.git-lfs+json"})


def lfs_upload(hub: FakeHub, req: Request, oid: str) -> Reply:
    if hashlib.sha256(req.body).hexdigest() != oid:
        return _json({"error": "sha256 mismatch"}, 400)
    hub.lfs[oid] = req.body
    return 200, {}, b""


def lfs_verify(hub: FakeHub, req: Request, oid: str) -> Reply:
    payload = req.json()
    ok = oid in hub.lfs and len(hub.lfs[oid]) == payload["size"]
    return _json({"success": ok}, 200 if ok else 404)


def resolve(hub: FakeHub, req: Request, repo_id: str, rev: str, path: str) -> Reply:
    found = _commit(hub, req, repo_id, rev)
    if not isinstance(found[0], Repo):
        return found
    blob = found[1].files.get(path)
    if blob is None:
        return _error(404, "EntryNotFound", f"{path} does not exist on {rev}")
    etag = blob.sha256 if blob.lfs else blob.oid
    headers = {"ETag": f'"{etag}"', "X-Repo-Commit": found[1].sha,
               "Content-Type": "application/octet-stream"}
    if blob.lfs:
        headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(blob.data))})
    return 200, headers, blob.data


def _collection(hub: FakeHub, slug: str) -> dict:
    return hub.collections[slug]


def create_collection(hub: FakeHub, req: Request) -> Reply:
    if not _authorized(hub, req):
        return _error(401, "Unauthorized", "Invalid credentials in Authorization header")
    payload = req.json()
    base = re.sub(r"[^a-z0-9]+", "-", payload["title"].lower()).strip("-")
    for slug, coll in hub.collections.items():
        if coll["owner"]["name"] == payload["namespace"] and coll["title"] == payload["title"]:
            return _json({"error": "Collection already exists", "slug": slug}, 409)
    slug = f"{payload['namespace']}/{base}-{len(hub.collections):024x}"
    hub.collections[slug] = {"slug": slug, "title": payload["title"], "owner": {"name": payload["namespace"]},
                             "items": [], "lastUpdated": NOW, "position": 0,
                             "private": bool(payload.get("private")), "theme": "default", "upvotes": 0,
                             "description": payload.get("description")}
    return _json(hub.collections[slug])


def get_collection(hub: FakeHub, req: Request, slug: str) -> Reply:
    if slug not in hub.collections:
        return _error(404, "NotFound", "Collection not found")
    return _json(hub.collections[slug])


def add_collection_item(hub: FakeHub, req: Request, slug: str) -> Reply:
    if not _authorized(hub, req):
        return _error(401, "Unauthorized", "Invalid credentials in Authorization header")
    if slug not in hub.collections:
        return _error(404, "NotFound", "Collection not found")
    item, coll = req.json()["item"], hub.collections[slug]
    if item["type"] == "model" and item["id"] not in hub.repos:
        return _error(404, "RepoNotFound", f"Repository not found: {item['id']}")
    if any(i["id"] == item["id"] for i in coll["items"]):
        return _json({"error": "Item already in collection"}, 409)
    coll["items"].append({"_id": f"{len(coll['items']):024x}", "id": item["id"], "type": item["type"],
                          "position": len(coll["items"])})
    return _json(coll)


REPO = r"(?P<repo_id>[\w.-]+/[\w.-]+)"
ROUTES = [
    ("GET", r"/api/agent-harnesses", lambda hub, req: _json({"error": "Not Found"}, 404)),
    ("POST", r"/api/repos/create", create_repo),
    ("POST", r"/api/validate-yaml", validate_yaml),
    ("GET", r"/api/whoami-v2", whoami),
    ("GET", rf"/api/models/{REPO}", repo_info),
    ("GET", rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)", repo_info),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", tree),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", preupload),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", commit),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", create_branch),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", lfs_batch),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", lfs_upload),
    ("POST", r"/lfs-verify/(?P<oid>[0-9a-f]{64})", lfs_verify),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", resolve),
    ("POST", r"/api/collections", create_collection),
    ("GET", r"/api/collections/(?P<slug>[\w.-]+/[\w.-]+)", get_collection),
    ("POST", r"/api/collections/(?P<slug>[\w.-]+/[\w.-]+)/items", add_collection_item),
]

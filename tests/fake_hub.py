"""A local stand-in for the Hugging Face Hub, speaking the HTTP API as huggingface_hub 2.4 uses it.

It covers what `lowbit push` needs, over real HTTP so that the client code runs
unchanged: whoami, repo creation and info, branches, paths-info, preupload
(regular vs LFS), the LFS batch API with upload and verify actions pointing back
here, NDJSON commits, and resolve to read files back. Uploads take the legacy
LFS path: tests must disable Xet (`constants.HF_HUB_DISABLE_XET`).

    with FakeHub() as hub:                       # tokens: hub.valid_tokens
        os.environ["HF_ENDPOINT"] = hub.endpoint
        ...
        hub.files[("user/repo", "config.json")]  # bytes on main
        hub.requests                             # every request, in order
        hub.commits                              # every commit applied
        hub.fail_next(500, r"/commit/", times=2)  # inject failures
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

FAKE_USER = "alice"
FAKE_TOKEN = "hf_FAKEtokenFAKEtokenFAKEtoken012345"
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".h5", ".msgpack", ".zip")
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


@dataclass
class LoggedRequest:
    method: str
    path: str  # without the query string, still URL-quoted
    query: dict[str, list[str]]
    status: int
    body: bytes
    user: str | None


@dataclass(frozen=True)
class Blob:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def git_oid(self) -> str:
        """Git's blob id: of the content for regular files, of the LFS pointer for LFS files."""
        data = self.content
        if self.lfs:
            data = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(data)}\n".encode()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    owner: str
    private: bool
    branches: dict[str, dict[str, Blob]]
    heads: dict[str, str]
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    pr_count: int = 0


@dataclass
class _FailureRule:
    status: int
    pattern: re.Pattern
    times: int
    skip: int
    message: str


class FakeHub:
    def __init__(self, valid_tokens: dict[str, str] | None = None, lfs_threshold: int = 10 * 1024 * 1024):
        self.valid_tokens = dict(valid_tokens) if valid_tokens is not None else {FAKE_TOKEN: FAKE_USER}
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.requests: list[LoggedRequest] = []
        self.commits: list[dict] = []
        self._rules: list[_FailureRule] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._commit_counter = 0

    # --- lifecycle -------------------------------------------------------------

    def __enter__(self) -> "FakeHub":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "use FakeHub as a context manager"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- knobs and views for tests ---------------------------------------------

    def fail_next(self, status: int, path_regex: str, times: int = 1, skip: int = 0, message: str = "") -> None:
        """Answer `status` to the next `times` requests whose path matches, after letting `skip` of them through."""
        rule = _FailureRule(status, re.compile(path_regex), times, skip, message or f"injected failure {status}")
        with self._lock:
            self._rules.append(rule)

    @property
    def files(self) -> dict[tuple[str, str], bytes]:
        """(repo_id, path) -> content, on each repo's main branch."""
        with self._lock:
            return {
                (repo_id, path): blob.content
                for repo_id, repo in self.repos.items()
                for path, blob in repo.branches["main"].items()
            }

    # --- request handling ------------------------------------------------------

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        split = urlsplit(target)
        query = parse_qs(split.query)
        user = self._user(headers)
        with self._lock:
            injected = self._injected_failure(split.path)
            status, out_headers, out_body = injected or self._route(method, split.path, query, user, body)
            self.requests.append(LoggedRequest(method, split.path, query, status, body, user))
        return status, out_headers, out_body

    def _user(self, headers: dict[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        return self.valid_tokens.get(token) if token else None

    def _injected_failure(self, path: str):
        for rule in self._rules:
            if rule.times > 0 and rule.pattern.search(path):
                if rule.skip > 0:
                    rule.skip -= 1
                    return None
                rule.times -= 1
                return _error(rule.status, rule.message)
        return None

    def _route(self, method: str, path: str, query: dict, user: str | None, body: bytes):
        repo = r"(?P<repo>[^/]+/[^/]+?)"
        routes = [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", rf"/api/models/{repo}(?:/revision/(?P<rev>[^/]+))?", self._repo_info),
            ("POST", rf"/api/models/{repo}/branch/(?P<rev>[^/]+)", self._create_branch),
            ("POST", rf"/api/models/{repo}/paths-info/(?P<rev>[^/]+)", self._paths_info),
            ("POST", rf"/api/models/{repo}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/api/models/{repo}/commit/(?P<rev>[^/]+)", self._commit),
            ("POST", rf"/{repo}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("POST", rf"/{repo}\.git/info/lfs/objects/verify", self._lfs_verify),
            ("PUT", rf"/__lfs/{repo}/(?P<oid>[0-9a-f]{{64}})", self._lfs_put),
            ("GET", rf"/{repo}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and method == route_method:
                args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                return handler(user=user, body=body, query=query, **args)
        return _error(404, f"no route for {method} {path}")

    # --- permission helpers ----------------------------------------------------

    def _writable(self, repo_id: str, user: str | None):
        """(repo, None) when `user` may write to `repo_id`, else (None, error response)."""
        if user is None:
            return None, _error(401, "Invalid credentials in Authorization header")
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, _error(404, "Repository not found", code="RepoNotFound")
        if repo.owner != user:
            return None, _error(403, f"You don't have the rights to write to {repo_id}")
        return repo, None

    def _readable(self, repo_id: str, user: str | None):
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and repo.owner != user):
            return None, _error(401 if user is None else 404, "Repository not found", code="RepoNotFound")
        return repo, None

    def _branch(self, repo: Repo, rev: str):
        if rev not in repo.branches:
            return None, _error(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return repo.branches[rev], None

    def _files_at(self, repo_id: str, user: str | None, rev: str, write: bool = False):
        """(repo, its files at `rev`, None) when `user` may read (or write) them, else (None, None, error)."""
        found, error = (self._writable if write else self._readable)(repo_id, user)
        if error:
            return None, None, error
        files, error = self._branch(found, rev)
        return found, files, error

    # --- endpoints -------------------------------------------------------------

    def _whoami(self, user, **_):
        if user is None:
            return _error(401, "Invalid credentials in Authorization header")
        return _json({"type": "user", "name": user, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def _create_repo(self, user, body, **_):
        if user is None:
            return _error(401, "Invalid credentials in Authorization header")
        payload = json.loads(body)
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if namespace != user:
            return _error(403, f"You don't have the rights to create a model under the namespace {namespace}")
        if repo_id in self.repos:
            return _json({"error": "You already created this model repo", "url": url}, status=409)
        initial = {".gitattributes": Blob(_GITATTRIBUTES, lfs=False)}
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.repos[repo_id] = Repo(user, private, {"main": initial}, {"main": self._new_commit_oid()})
        return _json({"url": url, "name": repo_id})

    def _validate_yaml(self, **_):
        return _json({"errors": [], "warnings": []})

    def _repo_info(self, user, repo, query, rev="main", **_):
        found, files, error = self._files_at(repo, user, rev)
        if error:
            return error
        with_blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = [_sibling(path, blob) if with_blobs else {"rfilename": path} for path, blob in files.items()]
        return _json({"id": repo, "sha": found.heads[rev], "private": found.private, "siblings": siblings})

    def _create_branch(self, user, repo, rev, body, **_):
        found, error = self._writable(repo, user)
        if error:
            return error
        if rev in found.branches:
            return _error(409, f"Branch {rev} already exists")
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        files, error = self._branch(found, start)
        if error:
            return error
        found.branches[rev] = dict(files)
        found.heads[rev] = found.heads[start]
        return _json({})

    def _paths_info(self, user, repo, rev, body, **_):
        found, files, error = self._files_at(repo, user, rev)
        if error:
            return error
        wanted = parse_qs(body.decode()).get("paths", [])
        return _json([_file_entry(path, files[path]) for path in wanted if path in files])

    def _preupload(self, user, repo, rev, body, **_):
        found, files, error = self._files_at(repo, user, rev, write=True)
        if error:
            return error
        answers = []
        for item in json.loads(body)["files"]:
            path, size, sample = item["path"], item["size"], base64.b64decode(item["sample"])
            is_lfs = path.endswith(_LFS_SUFFIXES) or size >= self.lfs_threshold or b"\0" in sample
            existing = files.get(path)
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.git_oid)
            mode = "lfs" if is_lfs else "regular"
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json({"files": answers})

    def _lfs_batch(self, user, repo, body, **_):
        found, error = self._writable(repo, user)
        if error:
            return error
        objects = []
        for item in json.loads(body)["objects"]:
            oid, size = item["oid"], item["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if found.lfs_objects.get(oid) is None or len(found.lfs_objects[oid]) != size:
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/__lfs/{repo}/{oid}"},
                    "verify": {"href": f"{self.endpoint}/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return _json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, repo, oid, body, **_):
        # Like a presigned S3 URL: no Authorization header is sent or needed.
        found = self.repos.get(repo)
        if found is None:
            return _error(404, "no such bucket")
        if hashlib.sha256(body).hexdigest() != oid:
            return _error(400, "content does not match its sha256")
        found.lfs_objects[oid] = body
        return 200, {"ETag": f'"{oid[:32]}"'}, b""

    def _lfs_verify(self, user, repo, body, **_):
        found, error = self._writable(repo, user)
        if error:
            return error
        item = json.loads(body)
        stored = found.lfs_objects.get(item["oid"])
        if stored is None or len(stored) != item["size"]:
            return _error(404, "object not uploaded")
        return _json({})

    def _commit(self, user, repo, rev, body, query, **_):
        found, files, error = self._files_at(repo, user, rev, write=True)
        if error:
            return error
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        new_files = dict(files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                new_files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                content = found.lfs_objects.get(value["oid"])
                if content is None:
                    return _error(422, f"LFS object {value['oid']} was not uploaded")
                new_files[value["path"]] = Blob(content, lfs=True)
            elif key in ("deletedFile", "deletedFolder"):
                folder = value["path"].rstrip("/") + "/"
                new_files = {p: b for p, b in new_files.items() if p != value["path"] and not p.startswith(folder)}
        pr_url = None
        if query.get("create_pr", ["0"])[0] == "1":
            found.pr_count += 1
            rev = f"refs/pr/{found.pr_count}"
            pr_url = f"{self.endpoint}/{repo}/discussions/{found.pr_count}"
        found.branches[rev] = new_files
        found.heads[rev] = oid = self._new_commit_oid()
        paths = [line["value"]["path"] for line in lines if line["key"] != "header"]
        self.commits.append({"repo_id": repo, "revision": rev, "summary": header["summary"], "paths": paths})
        commit_url = f"{self.endpoint}/{repo}/commit/{oid}"
        return _json({"commitUrl": commit_url, "commitOid": oid, "pullRequestUrl": pr_url, "success": True})

    def _resolve(self, user, repo, rev, file, **_):
        found, files, error = self._files_at(repo, user, rev)
        if error:
            return error
        if file not in files:
            return _error(404, f"{file} not found", code="EntryNotFound")
        return 200, {"Content-Type": "application/octet-stream", "X-Repo-Commit": found.heads[rev]}, files[file].content

    def _new_commit_oid(self) -> str:
        self._commit_counter += 1
        return hashlib.sha1(f"commit {self._commit_counter}".encode()).hexdigest()


# --- HTTP plumbing -----------------------------------------------------------


def _json(payload, status: int = 200):
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _error(status: int, message: str, code: str | None = None):
    headers = {"Content-Type": "application/json", "X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return status, headers, json.dumps({"error": message}).encode()


def _file_entry(path: str, blob: Blob) -> dict:
    entry = {"type": "file", "path": path, "size": len(blob.content), "oid": blob.git_oid}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.content), "pointerSize": 134}
    return entry


def _sibling(path: str, blob: Blob) -> dict:
    entry = {"rfilename": path, "size": len(blob.content), "blobId": blob.git_oid}
    if blob.lfs:
        entry["lfs"] = {"sha256": blob.sha256, "size": len(blob.content), "pointerSize": 134}
    return entry


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else each response waits ~40 ms for a delayed ACK
        timeout = 30  # idle keep-alive connections end on their own

        def _serve(self) -> None:
            headers = {key.lower(): value for key, value in self.headers.items()}
            status, out_headers, out_body = hub.handle(self.command, self.path, headers, self._read_body(headers))
            self.send_response(status)
            for key, value in out_headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(out_body)))
            self.end_headers()
            self.wfile.write(out_body)

        def _read_body(self, headers: dict[str, str]) -> bytes:
            if headers.get("transfer-encoding", "").lower() == "chunked":
                chunks = []
                while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(headers.get("content-length", 0)))

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args) -> None:
            pass

    return Handler

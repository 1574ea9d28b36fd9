"""A no-op Dashboard API for the peerbench `crud` driver: the driver's own floor.

    python -m bench.null_server      (prints its port, serves until killed)

Every answer is fixed and costs this server next to nothing: `POST
/api/projects` and `POST /api/tasks` say 201 with an id, `GET /api/tasks`
gives 1,000 task objects shaped like lokid's (so the driver parses as many
bytes as from lokid), a move says 200. HTTP/1.1 keep-alive, one thread per
connection, loopback only. Run against it with the same arguments (and
`--verify none`), the driver's latencies are what it costs by itself on
this machine: the part of any server's figure no server can remove.
"""

from __future__ import annotations

import json
import socket
import threading

TASK = {
    "id": "task-000000000000",
    "project_id": "proj-000000000000",
    "title": "Task 0",
    "description": "benchmark task",
    "column": "backlog",
    "status": "pending",
    "priority": "medium",
    "position": 0,
    "created_at": "2026-11-29T00:00:00Z",
    "updated_at": "2026-11-29T00:00:00Z",
}
PROJECT = {"id": "proj-000000000000", "name": "crud", "taskCount": 0}
LIST_SIZE = 1000


def _answer(status: str, value: object) -> bytes:
    body = json.dumps(value).encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


CREATED_TASK = _answer("201 Created", TASK)
CREATED_PROJECT = _answer("201 Created", PROJECT)
TASK_LIST = _answer("200 OK", [{**TASK, "position": i} for i in range(LIST_SIZE)])
MOVED = _answer("200 OK", TASK)


def answer_for(request_line: bytes) -> bytes:
    method, _, rest = request_line.partition(b" ")
    path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
    if method == b"POST" and path == b"/api/projects":
        return CREATED_PROJECT
    if method == b"POST" and path == b"/api/tasks":
        return CREATED_TASK
    if method == b"POST":
        return MOVED
    return TASK_LIST


def serve_connection(conn: socket.socket) -> None:
    buffer = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            buffer = buffer[length:]
            conn.sendall(answer_for(lines[0]))


def main() -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve_connection, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()

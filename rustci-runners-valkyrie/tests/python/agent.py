"""A second Valkyrie agent, written from docs/valkyrie.md and the .proto only.

It registers with a token and the control plane's CA file, opens a mutual-TLS session,
heartbeats, accepts offers, runs `run:` and `command:` steps with /bin/sh or directly,
streams output with offsets, and completes with the output's length and SHA-256.

Usage: agent.py --server HOST:PORT --token TOKEN --ca CA.pem --gen DIR --name NAME
(DIR holds the Python code grpcio-tools generated from valkyrie.proto).
"""

import argparse
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SERVER_NAME = "rustci-control-plane"
PROTOCOL_VERSION = 2


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--gen", required=True)
    p.add_argument("--name", default="python-agent")
    args = p.parse_args()
    sys.path.insert(0, args.gen)
    import grpc
    from valkyrie.v1 import valkyrie_pb2 as pb
    from valkyrie.v1 import valkyrie_pb2_grpc as pbg

    ca = open(args.ca, "rb").read()
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]

    # Registration: a key of our own, a CSR, a token.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.name)]))
        .sign(key, hashes.SHA256())
    )
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(args.server, creds, options) as ch:
        r = pbg.ValkyrieStub(ch).Register(
            pb.RegisterRequest(
                token=args.token,
                csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
                name=args.name,
                hostname="python",
                version="py-0.1",
                labels=["python"],
            )
        )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    print(f"registered {r.agent_id}", flush=True)

    mtls = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=key_pem,
        certificate_chain=r.certificate_pem.encode(),
    )
    channel = grpc.secure_channel(args.server, mtls, options)
    stub = pbg.ValkyrieStub(channel)

    outbox = queue.Queue()
    chunks = queue.Queue()
    capabilities = {
        "run_steps": True,
        "command_steps": True,
        "images": False,
        "needs_image": False,
        "isolation": "process",
        "limits": [],
        "max_concurrency": 1,
        "termination_grace": {"secs": 5, "nanos": 0},
        "platform": "linux/x86_64",
        "gpus": 0,
        "cpus": None,
        "memory": None,
    }
    outbox.put(
        pb.AgentMessage(
            hello=pb.Hello(
                protocol=PROTOCOL_VERSION,
                agent_version="py-0.1",
                boot_id=str(uuid.uuid4()),
                hostname="python",
                runners=[
                    pb.LocalRunner(
                        name="py",
                        kind="local",
                        labels=[],
                        slots=1,
                        capabilities_json=json.dumps(capabilities),
                    )
                ],
            )
        )
    )

    def requests(q):
        while True:
            m = q.get()
            if m is None:
                return
            yield m

    session = stub.Session(requests(outbox))
    welcome = next(session)
    assert welcome.WhichOneof("kind") == "welcome", welcome
    interval = welcome.welcome.heartbeat_interval_ms / 1000.0
    print(f"session {welcome.welcome.session_id}", flush=True)

    acked = {}
    acked_cv = threading.Condition()

    def read_acks():
        for ack in stub.Output(requests(chunks)):
            key = (ack.attempt.job_id, ack.attempt.attempt)
            with acked_cv:
                acked[key] = ack.offset
                acked_cv.notify_all()

    threading.Thread(target=read_acks, daemon=True).start()

    def heartbeats():
        seq = 0
        while True:
            seq += 1
            outbox.put(pb.AgentMessage(heartbeat=pb.Heartbeat(seq=seq, free={"py": 1})))
            time.sleep(interval)

    threading.Thread(target=heartbeats, daemon=True).start()

    # Attempts taken (key -> aborted?); an aborted one is released, not completed, once
    # it has stopped.
    held = {}
    # The process of each attempt's current step, stopped at once by an abort.
    procs = {}
    held_lock = threading.Lock()

    def stop(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def release(ref):
        outbox.put(pb.AgentMessage(released=pb.Released(attempt=ref)))

    def run(offer):
        ref = offer.attempt
        key = (ref.job_id, ref.attempt)
        job = json.loads(offer.job_json)
        outbox.put(pb.AgentMessage(accept=pb.Accept(attempt=ref)))
        offset = 0
        digest = hashlib.sha256()
        outcome = {"result": "succeeded"}
        env = dict(job.get("env", {}))
        env.setdefault("PATH", "/usr/bin:/bin")
        with tempfile.TemporaryDirectory() as work:
            for i, step in enumerate(job["steps"]):
                name = step.get("name") or f"step {i + 1}"
                outbox.put(
                    pb.AgentMessage(
                        event=pb.AttemptEvent(
                            attempt=ref, step_started=pb.StepStarted(step=i, name=name)
                        )
                    )
                )
                argv = ["/bin/sh", "-c", step["run"]] if "run" in step else step["command"]
                step_env = dict(env)
                step_env.update(step.get("env", {}))
                proc = subprocess.Popen(
                    argv,
                    cwd=work,
                    env=step_env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
                with held_lock:
                    procs[key] = proc
                    if held.get(key):
                        stop(proc)
                stdout, stderr = proc.communicate()
                with held_lock:
                    procs.pop(key, None)
                    if held.get(key):
                        # Aborted: stopped, and no further step runs.
                        break
                for stream, data in ((0, stdout), (1, stderr)):
                    if data:
                        chunks.put(
                            pb.OutputChunk(
                                attempt=ref, offset=offset, data=data, stream=stream, step=i
                            )
                        )
                        offset += len(data)
                        digest.update(data)
                status = {"exited": proc.returncode}
                outbox.put(
                    pb.AgentMessage(
                        event=pb.AttemptEvent(
                            attempt=ref,
                            step_finished=pb.StepFinished(
                                step=i, name=name, status_json=json.dumps(status), duration_ms=0
                            ),
                        )
                    )
                )
                if proc.returncode != 0:
                    outcome = {
                        "result": "failed",
                        "step": i,
                        "step_name": name,
                        "exit_code": proc.returncode,
                    }
                    break
        # Complete only once every byte is acknowledged.
        if not held.get(key):
            with acked_cv:
                acked_cv.wait_for(
                    lambda: acked.get(key, 0) >= offset or offset == 0, timeout=30
                )
        # Let go under the lock that aborts take: an abort before this is answered with
        # Released and no completion; one after it finds nothing held and is answered
        # with Released behind the completion.
        with held_lock:
            aborted = held.pop(key, False)
            if aborted:
                release(ref)
            else:
                outbox.put(
                    pb.AgentMessage(
                        complete=pb.Complete(
                            attempt=ref,
                            outcome_json=json.dumps(outcome),
                            length=offset,
                            sha256=digest.hexdigest(),
                            dropped=0,
                        )
                    )
                )

    for m in session:
        kind = m.WhichOneof("kind")
        if kind == "offer":
            # Held before the next message is read, so an abort right behind it finds it.
            with held_lock:
                held[(m.offer.attempt.job_id, m.offer.attempt.attempt)] = False
            threading.Thread(target=run, args=(m.offer,), daemon=True).start()
        elif kind == "abort":
            ref = m.abort.attempt
            with held_lock:
                running = (ref.job_id, ref.attempt) in held
                if running:
                    held[(ref.job_id, ref.attempt)] = True
                    proc = procs.get((ref.job_id, ref.attempt))
                    if proc is not None:
                        stop(proc)
            if not running:
                release(ref)
        elif kind == "complete_ack":
            print(f"completed {m.complete_ack.attempt.job_id}", flush=True)
        elif kind == "disconnect":
            print(f"disconnected: {m.disconnect.reason}", flush=True)
            return


if __name__ == "__main__":
    main()

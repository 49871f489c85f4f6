//! The OpenAPI 3.1 description of the HTTP API, served at `/api/openapi.json`.

use serde_json::{Value, json};

fn err(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn ok(description: &str, schema: Value) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": schema}}
    })
}

fn r(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// Errors every authenticated route may answer.
fn common(mut responses: Value) -> Value {
    let m = responses.as_object_mut().expect("object");
    m.insert("401".into(), err("Missing or invalid API key"));
    m.insert("403".into(), err("The key's role may not do this"));
    m.insert("429".into(), err("Rate limit exceeded"));
    m.insert(
        "503".into(),
        err("The request timed out or the server is shutting down"),
    );
    responses
}

fn id_param(name: &str, what: &str) -> Value {
    json!({
        "name": name, "in": "path", "required": true,
        "description": what,
        "schema": {"type": "string"}
    })
}

fn op(summary: &str, id: &str, params: Value, responses: Value) -> Value {
    json!({
        "summary": summary,
        "operationId": id,
        "parameters": params,
        "responses": common(responses),
    })
}

/// The document.
pub fn document() -> Value {
    let job_id = id_param("id", "Job id");
    let runner_id = id_param("id", "Runner id");
    let state_enum = json!([
        "queued",
        "assigned",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "timed_out",
        "lost"
    ]);
    let mut submit = op(
        "Submit a job (the job document of docs/job-format.md, as JSON or YAML)",
        "submitJob",
        json!([]),
        json!({
            "201": ok("Queued", r("Submitted")),
            "400": err("The document is malformed or breaks the job format"),
            "413": err("The body is too large"),
        }),
    );
    submit["responses"]["201"]["links"] = json!({
        "GetJob": {"operationId": "getJob", "parameters": {"id": "$response.body#/id"}},
        "JobLogs": {"operationId": "jobLogs", "parameters": {"id": "$response.body#/id"}},
        "CancelJob": {"operationId": "cancelJob", "parameters": {"id": "$response.body#/id"}}
    });
    submit["requestBody"] = json!({
        "required": true,
        "content": {
            "application/json": {"schema": r("JobDocument")},
            "application/yaml": {"schema": r("JobDocument")}
        }
    });
    let mut register = op(
        "Register an in-process runner (registration token or admin key)",
        "registerRunner",
        json!([]),
        json!({
            "201": ok("Registered", r("Runner")),
            "400": err("Invalid runner description"),
            "413": err("The body is too large"),
        }),
    );
    register["requestBody"] = json!({
        "required": true,
        "content": {"application/json": {"schema": r("RunnerRegistration")}}
    });
    let mut token = op(
        "Create a runner registration token (admin)",
        "createToken",
        json!([]),
        json!({
            "201": ok("Created", r("Token")),
            "400": err("Invalid request"),
            "413": err("The body is too large"),
        }),
    );
    token["requestBody"] = json!({
        "required": false,
        "content": {"application/json": {"schema": r("TokenRequest")}}
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "rustci-runners control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Queue, dispatch and follow CI jobs on registered runners."
        },
        "security": [{"apiKey": []}, {"bearer": []}],
        "paths": paths(job_id, runner_id, &state_enum, submit, register, token),
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"}
            },
            "schemas": schemas(&state_enum)
        }
    })
}

fn list_runners_op() -> Value {
    let mut list = op(
        "List runners",
        "listRunners",
        json!([]),
        json!({
            "200": ok("Runners", json!({"type": "object", "required": ["runners"], "properties": {"runners": {"type": "array", "items": r("Runner")}}})),
        }),
    );
    let mut links = serde_json::Map::new();
    for (name, id) in [
        ("GetRunner", "getRunner"),
        ("RunnerStatus", "runnerStatus"),
        ("CheckRunnerHealth", "checkRunnerHealth"),
        ("DrainRunner", "drainRunner"),
        ("ResumeRunner", "resumeRunner"),
    ] {
        links.insert(
            name.into(),
            json!({"operationId": id, "parameters": {"id": "$response.body#/runners/0/id"}}),
        );
    }
    list["responses"]["200"]["links"] = Value::Object(links);
    list
}

fn paths(
    job_id: Value,
    runner_id: Value,
    state_enum: &Value,
    submit: Value,
    register: Value,
    token: Value,
) -> Value {
    let runner_action = |summary: &str, id: &str| {
        op(
            summary,
            id,
            json!([runner_id.clone()]),
            json!({
                "200": ok("Done", r("RunnerState")),
                "404": err("No such runner"),
            }),
        )
    };
    let list_runners = list_runners_op();
    json!({
        "/api/jobs": {
            "get": op("List jobs, newest first", "listJobs", json!([
                {"name": "state", "in": "query", "schema": {"type": "string", "enum": state_enum}},
                {"name": "submitter", "in": "query", "schema": {"type": "string"}},
                {"name": "runner", "in": "query", "description": "Only jobs with an attempt on this runner (by id)", "schema": {"type": "string"}},
                {"name": "name", "in": "query", "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                {"name": "cursor", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 9_007_199_254_740_991u64}}
            ]), json!({
                "200": ok("A page of jobs", r("JobPage")),
                "400": err("Invalid query"),
            })),
            "post": submit,
        },
        "/api/jobs/{id}": {
            "get": op("A job with its attempts and transitions", "getJob", json!([job_id.clone()]), json!({
                "200": ok("The job", r("Job")),
                "404": err("No such job"),
            })),
        },
        "/api/jobs/{id}/cancel": {
            "post": op("Cancel a queued or running job", "cancelJob", json!([job_id.clone()]), json!({
                "202": ok("Cancel requested", r("Submitted")),
                "404": err("No such job"),
                "409": err("The job has already ended"),
            })),
        },
        "/api/jobs/{id}/logs": {
            "get": {
                "summary": "A job's output: stored bytes, or with follow=true server-sent events (event log: id = next offset, data = {offset, text, stderr?: [[start, end]] UTF-16 ranges of text from stderr}; event end: data = {state, offset}); resumable with offset or Last-Event-ID",
                "operationId": "jobLogs",
                "parameters": [
                    job_id,
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 9_007_199_254_740_991u64}},
                    {"name": "follow", "in": "query", "schema": {"type": "boolean"}}
                ],
                "responses": common(json!({
                    "200": {
                        "description": "Output from the offset",
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "text/event-stream": {"schema": {
                                "description": "One server-sent event",
                                "type": "object",
                                "required": ["event", "data"],
                                "properties": {
                                    "event": {"type": "string", "enum": ["log", "end", "error"]},
                                    "id": {"type": "string", "pattern": "^[0-9]+$"},
                                    "data": {"type": "string"}
                                }
                            }}
                        }
                    },
                    "400": err("Invalid query"),
                    "404": err("No such job"),
                    "410": err("LOG_EXPIRED: the retention policy deleted this job's log (the job's record remains)"),
                }))
            }
        },
        "/api/runners": {
            "get": list_runners,
            "post": register,
        },
        "/api/runners/{id}": {
            "get": op("A runner", "getRunner", json!([runner_id.clone()]), json!({
                "200": ok("The runner", r("Runner")),
                "404": err("No such runner"),
            })),
            "delete": runner_action("Remove a runner (its running jobs are lost and retried per policy). For a remote agent's runner (kind valkyrie) this revokes the agent, admin only: its session closes, all its runners leave, and it can never reconnect", "deleteRunner"),
        },
        "/api/runners/{id}/status": {
            "get": op("A runner's status and load", "runnerStatus", json!([runner_id.clone()]), json!({
                "200": ok("Status", r("RunnerStatus")),
                "404": err("No such runner"),
            })),
        },
        "/api/runners/{id}/health": {
            "post": op("Check a runner's health now", "checkRunnerHealth", json!([runner_id.clone()]), json!({
                "200": ok("Health", r("RunnerHealth")),
                "404": err("No such runner"),
            })),
        },
        "/api/runners/{id}/drain": {
            "post": runner_action("Stop giving a runner new jobs", "drainRunner"),
        },
        "/api/runners/{id}/resume": {
            "post": runner_action("Give a drained runner jobs again", "resumeRunner"),
        },
        "/api/tokens": {
            "post": token,
            "get": op("Registration tokens that have not expired, with what became of each (admin)", "listTokens", json!([]), json!({
                "200": ok("Tokens", json!({"type": "object", "required": ["tokens"], "properties": {"tokens": {"type": "array", "items": r("TokenEntry")}}})),
            })),
        },
        "/api/tokens/{id}": {
            "delete": {
                "summary": "Revoke a registration token: it registers nothing from now on (admin)",
                "operationId": "revokeToken",
                "parameters": [id_param("id", "Token id (the id POST /api/tokens answered)")],
                "responses": common(json!({
                    "204": {"description": "Revoked (also a UUID this ledger never saw: a token issued before it kept one is refused from now on)"},
                    "404": err("The id is not a token id (a UUID)"),
                })),
            },
        },
        "/api/agents": {
            "get": op("Remote agents and their status", "listAgents", json!([]), json!({
                "200": ok("Agents", json!({"type": "object", "required": ["agents"], "properties": {"agents": {"type": "array", "items": r("Agent")}}})),
                "404": err("This server does not listen for agents"),
            })),
        },
        "/api/agents/{id}": {
            "get": op("One remote agent", "getAgent", json!([id_param("id", "Agent id")]), json!({
                "200": ok("The agent", r("Agent")),
                "404": err("No such agent, or no agent listener"),
            })),
            "delete": op("Revoke an agent: its session closes at once, its runners go, its running jobs are lost (and retried per policy), and it cannot reconnect (admin)", "revokeAgent", json!([id_param("id", "Agent id")]), json!({
                "200": ok("Revoked", json!({"type": "object", "required": ["revoked"], "properties": {"revoked": {"type": "string"}}})),
                "404": err("No such agent, or no agent listener"),
            })),
        },
        "/api/audit": {
            "get": op("The audit log, newest first (admin)", "listAudit", json!([
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 9_007_199_254_740_991u64}}
            ]), json!({
                "200": ok("Entries", r("AuditPage")),
                "400": err("Invalid query"),
            })),
        },
        "/healthz": {
            "get": {
                "summary": "Liveness", "operationId": "healthz", "security": [],
                "responses": {"200": ok("Alive", json!({"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}))}
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: the store answers and jobs are taken", "operationId": "readyz", "security": [],
                "responses": {
                    "200": ok("Ready", json!({"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}, "runners_taking_jobs": {"type": "integer"}}})),
                    "503": err("Not ready")
                }
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics: OpenMetrics when asked for (Accept), else the text format 0.0.4. Open unless the server restricts it (`metrics_allow`: networks; `metrics_key_required`: any API key but a registration token)", "operationId": "metrics", "security": [],
                "responses": {
                    "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}, "application/openmetrics-text": {"schema": {"type": "string"}}}},
                    "401": err("`metrics_key_required` is set and no valid API key was given"),
                    "403": err("The client's address is not in `metrics_allow`, or a registration token was given"),
                    "429": err("`metrics_key_required` is set and this address sent too many requests")
                }
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This document", "operationId": "openapi", "security": [],
                "responses": {"200": ok("OpenAPI document", json!({"type": "object"}))}
            }
        }
    })
}

fn schemas(state_enum: &Value) -> Value {
    json!({
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": [
                        "INVALID_REQUEST", "JOB_NOT_FOUND", "RUNNER_NOT_FOUND", "NOT_FOUND",
                        "METHOD_NOT_ALLOWED", "AUTHENTICATION_REQUIRED", "AUTHORIZATION_FAILED",
                        "RATE_LIMIT_EXCEEDED", "PAYLOAD_TOO_LARGE", "JOB_FINISHED",
                        "AGENT_NOT_FOUND", "TOKEN_NOT_FOUND",
                        "UNAVAILABLE", "NOT_READY", "TIMEOUT", "INTERNAL_ERROR"]},
                    "message": {"type": "string"},
                    "details": {}
                }
            }}
        },
        "JobDocument": job_document(),
        "Step": step(),
        "Submitted": {
            "type": "object", "required": ["id", "state"],
            "properties": {"id": {"type": "string"}, "state": {"type": "string", "enum": state_enum}}
        },
        "Outcome": {
            "type": ["object", "null"],
            "description": "how a job ended, by `result`: succeeded; failed {step, step_name, exit_code}; signalled {step, step_name, signal, oom_killed}; timed_out {step}; cancelled; lost; runner_error {message, temporary} (temporary: whether running the job again may succeed; only those are retried under retry.when runner_failure)",
            "properties": {"result": {"type": "string", "enum": ["succeeded", "failed", "signalled", "timed_out", "cancelled", "lost", "runner_error"]}}
        },
        "Attempt": {
            "type": "object", "required": ["number", "runner_id", "started_at"],
            "properties": {
                "number": {"type": "integer"},
                "runner_id": {"type": "string"},
                "started_at": {"type": "integer"},
                "ended_at": {"type": ["integer", "null"]},
                "outcome": r("Outcome"),
                "log_offset": {"type": "integer", "minimum": 0},
                "declined": {"type": "boolean", "description": "the runner handed the job back before any of it ran; this attempt did not count toward retry.max (absent when false)"},
                "usage": r("ResourceUsage"),
                "degraded": {"type": "string", "description": "the runner was degraded when the job was placed on it (no runner that is not fit the job then): why"}
            }
        },
        "ResourceUsage": {
            "type": "object",
            "description": "What the attempt used, measured by its runner; a figure it did not measure is absent, never zero",
            "properties": {
                "cpu_user_seconds": {"type": "number", "minimum": 0},
                "cpu_system_seconds": {"type": "number", "minimum": 0},
                "peak_memory_bytes": {"type": "integer", "minimum": 0},
                "read_bytes": {"type": "integer", "minimum": 0},
                "written_bytes": {"type": "integer", "minimum": 0},
                "source": {"type": "string", "description": "where the figures come from, e.g. rusage, cgroup v1 (memory), docker stats"}
            }
        },
        "JobSummary": {
            "type": "object",
            "required": ["id", "name", "state", "submitter", "attempts", "submitted_at"],
            "properties": {
                "id": {"type": "string"},
                "name": {"type": "string"},
                "state": {"type": "string", "enum": state_enum},
                "submitter": {"type": "string"},
                "priority": {"type": "integer"},
                "runner_id": {"type": ["string", "null"]},
                "attempts": {"type": "array", "items": r("Attempt")},
                "submitted_at": {"type": "integer"},
                "finished_at": {"type": ["integer", "null"]},
                "outcome": r("Outcome"),
                "why_pending": {"type": ["string", "null"]}
            }
        },
        "Job": {
            "allOf": [r("JobSummary"), {
                "type": "object",
                "properties": {
                    "job": {"type": "object"},
                    "transitions": {"type": "array", "items": {
                        "type": "object", "required": ["state", "at"],
                        "properties": {"state": {"type": "string"}, "at": {"type": "integer"}}
                    }},
                    "log": {
                        "description": "Once the job ended: where retention has its log",
                        "type": "object", "required": ["state", "stored_bytes", "bytes"],
                        "properties": {
                            "state": {"type": "string", "enum": ["finished", "plain", "compressed", "expiring", "expired"]},
                            "stored_bytes": {"type": "integer", "minimum": 0},
                            "bytes": {"type": "integer", "minimum": 0}
                        }
                    }
                }
            }]
        },
        "JobPage": {
            "type": "object", "required": ["jobs"],
            "properties": {
                "jobs": {"type": "array", "items": r("JobSummary")},
                "next_cursor": {"type": ["integer", "null"]}
            }
        },
        "Runner": {
            "type": "object", "required": ["id", "name", "kind", "status"],
            "properties": {
                "id": {"type": "string"},
                "name": {"type": "string"},
                "kind": {"type": "string"},
                "labels": {"type": "array", "items": {"type": "string"}},
                "reserved_labels": {"type": "array", "items": {"type": "string"}},
                "status": {"type": "string"},
                "health": {"type": "string"},
                "running": {"type": "integer"},
                "slots": {"type": ["integer", "null"]},
                "capabilities": {"type": "object"},
                "startup_ms": {"type": ["number", "null"]},
                "pressure": {
                    "description": "what the runner's host had left at its last health check, from runners that measure it (host runners); else null",
                    "type": ["object", "null"],
                    "properties": {
                        "load_1m": {"type": "number"},
                        "memory_available_bytes": {"type": "integer", "minimum": 0},
                        "disk_free_bytes": {"type": "integer", "minimum": 0},
                        "disk_total_bytes": {"type": "integer", "minimum": 0},
                        "disk_used_percent": {"type": "number"}
                    }
                },
                "agent": {
                    "description": "the remote agent this runner belongs to (kind valkyrie), else null",
                    "type": ["object", "null"],
                    "required": ["id", "hostname", "version", "status"],
                    "properties": {
                        "id": {"type": "string"},
                        "hostname": {"type": "string"},
                        "address": {"type": ["string", "null"]},
                        "version": {"type": "string"},
                        "status": {"type": "string", "enum": ["healthy", "draining", "disconnected", "lost"]},
                        "last_heartbeat_ms": {"type": ["integer", "null"]},
                        "withdrawn": {"type": "integer", "minimum": 0, "description": "offers not accepted in time that the agent may still be running; their jobs wait until it stops them"}
                    }
                }
            }
        },
        "RunnerStatus": {
            "type": "object", "required": ["id", "status"],
            "properties": {
                "id": {"type": "string"}, "status": {"type": "string"},
                "health": {"type": "string"}, "running": {"type": "integer"},
                "slots": {"type": ["integer", "null"]}
            }
        },
        "RunnerHealth": {
            "type": "object", "required": ["id", "health"],
            "properties": {"id": {"type": "string"}, "health": {"type": "string"}, "status": {"type": "string"}}
        },
        "RunnerState": {
            "type": "object", "required": ["id", "status"],
            "properties": {"id": {"type": "string"}, "status": {"type": "string"}}
        },
        "RunnerRegistration": {
            "type": "object", "required": ["name", "kind"], "additionalProperties": false,
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
                "kind": {"type": "string", "enum": crate::backends().kinds(), "description": "a kind compiled into this server"},
                "labels": {"type": "array", "items": {"type": "string"}},
                "reserved_labels": {"type": "array", "items": {"type": "string"}},
                "slots": {"type": ["integer", "null"], "minimum": 1, "maximum": 1024},
                "workspace_root": {"type": "string", "minLength": 1},
                "docker": {"type": "object", "description": "kind docker only, admin only: the Docker runner's options (engine, pull_policy, registry_auth, default_image, network_mode, privileged, allowed_privileged_images, read_only_rootfs, cap_drop, user, termination_grace, max_output_bytes, event_buffer, warm_pool); unknown fields are refused"},
                "kubernetes": {"type": "object", "description": "kind kubernetes only, admin only: the Kubernetes runner's options (connection, namespace, default_image, pod, pending_timeout, termination_grace, deadline_margin, requests_per_second, log_streams, max_output_bytes, event_buffer); unknown fields are refused"}
            }
        },
        "TokenRequest": {
            "type": "object", "additionalProperties": false,
            "properties": {
                "ttl_seconds": {"type": ["integer", "null"], "minimum": 1, "maximum": 2592000},
                "labels": {"type": "array", "items": {"type": "string"}}
            }
        },
        "TokenEntry": {
            "type": "object",
            "required": ["id", "issued_by", "expires_at", "labels", "state"],
            "properties": {
                "id": {"type": "string"},
                "issued_by": {"type": "string"},
                "expires_at": {"type": "integer", "description": "seconds since the Unix epoch"},
                "labels": {"type": "array", "items": {"type": "string"}},
                "state": {"type": "string", "enum": ["active", "used", "revoked"]},
                "by": {"type": "string", "description": "what it registered (used) or who revoked it (revoked)"}
            }
        },
        "Agent": {
            "type": "object",
            "required": ["id", "name", "hostname", "version", "labels", "status", "runners", "running", "withdrawn"],
            "properties": {
                "id": {"type": "string"},
                "name": {"type": "string"},
                "hostname": {"type": "string"},
                "address": {"type": ["string", "null"]},
                "version": {"type": "string"},
                "labels": {"type": "array", "items": {"type": "string"}},
                "status": {"type": "string", "enum": ["healthy", "draining", "disconnected", "lost"]},
                "last_heartbeat_ms": {"type": ["integer", "null"]},
                "runners": {"type": "array", "items": {"type": "string"}},
                "running": {"type": "integer", "minimum": 0, "description": "attempts it holds, withdrawn offers included"},
                "withdrawn": {"type": "integer", "minimum": 0, "description": "offers not accepted in time that it may still be running; their jobs wait until it stops them"}
            }
        },
        "Token": {
            "type": "object", "required": ["token", "id", "expires_at"],
            "properties": {
                "token": {"type": "string"}, "id": {"type": "string"},
                "expires_at": {"type": "integer"},
                "labels": {"type": "array", "items": {"type": "string"}}
            }
        },
        "AuditPage": {
            "type": "object", "required": ["entries"],
            "properties": {
                "entries": {"type": "array", "items": {
                    "type": "object", "required": ["seq", "at", "actor", "action", "result"],
                    "properties": {
                        "seq": {"type": "integer"}, "at": {"type": "integer"},
                        "actor": {"type": "string"}, "action": {"type": "string"},
                        "target": {"type": ["string", "null"]},
                        "result": {"type": "string"},
                        "request_id": {"type": ["string", "null"]}
                    }
                }},
                "next_before": {"type": ["integer", "null"]}
            }
        }
    })
}

fn duration() -> Value {
    json!({"type": "string", "pattern": "^[1-9][0-9]{0,5}(ms|s|m|h)$"})
}

fn size() -> Value {
    json!({
        "oneOf": [
            {"type": "integer", "minimum": 1, "maximum": 1_099_511_627_776u64},
            {"type": "string", "pattern": "^[1-9][0-9]{0,5}(Ki|Mi|Gi|k|M|G)?$"}
        ]
    })
}

fn env_map() -> Value {
    json!({
        "type": "object",
        "propertyNames": {
            "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$",
            "not": {"pattern": "^RUSTCI(_|$)"},
            "description": "RUSTCI and RUSTCI_* are reserved for the variables the runner sets"
        },
        "additionalProperties": {"type": "string", "pattern": "^[^\\x00]*$"}
    })
}

/// One step: exactly one of `run` and `command`.
fn step() -> Value {
    let common = json!({
        "name": {"type": "string", "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]{1,128}$"},
        "timeout": duration(),
        "continue_on_error": {"type": "boolean"},
        "env": env_map()
    });
    let with = |key: &str, schema: Value| {
        let mut props = common.clone();
        props[key] = schema;
        json!({
            "type": "object",
            "required": [key],
            "additionalProperties": false,
            "properties": props
        })
    };
    json!({
        "oneOf": [
            with("run", json!({"type": "string", "maxLength": 1_048_576, "pattern": "^[^\\x00]*$"})),
            with("command", json!({
                "type": "array", "minItems": 1, "maxItems": 1000,
                "items": {"type": "string", "minLength": 1, "pattern": "^[^\\x00]+$"}
            }))
        ]
    })
}

/// A job document as docs/job-format.md defines it (the server checks the same rules and names
/// the field of any problem).
fn job_document() -> Value {
    json!({
        "type": "object",
        "required": ["name", "steps"],
        "additionalProperties": false,
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
            "steps": {"type": "array", "minItems": 1, "maxItems": 100, "items": r("Step")},
            "env": env_map(),
            "secrets": env_map(),
            "timeout": duration(),
            "workdir": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,8}$"},
            "image": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._/:@-]{0,254}$"},
            "resources": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "cpus": {"type": "number", "exclusiveMinimum": 0, "maximum": 4096},
                    "memory": size(),
                    "pids": {"type": "integer", "minimum": 1, "maximum": 4_194_304},
                    "cpu_time": duration(),
                    "open_files": {"type": "integer", "minimum": 1, "maximum": 1_048_576},
                    "file_size": size()
                }
            },
            "runs_on": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "kind": {"type": "string", "enum": ["local", "native", "docker", "kubernetes", "valkyrie"]},
                    "labels": {"type": "array", "maxItems": 64, "items": {"type": "string", "pattern": "^[A-Za-z0-9._:/=-]{1,128}$"}}
                }
            },
            "priority": {"type": "integer", "minimum": -2_147_483_648i64, "maximum": 2_147_483_647},
            "retry": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "max": {"type": "integer", "minimum": 0, "maximum": 10},
                    "when": {"type": "array", "items": {"type": "string", "enum": ["failure", "timeout", "runner_failure", "lost"]}}
                }
            }
        }
    })
}

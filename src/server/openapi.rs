//! The OpenAPI 3.0 description of the HTTP API, served at `/api/openapi.json`.

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
        "Submit a job (the job document of JOBS.md, as JSON or YAML)",
        "submitJob",
        json!([]),
        json!({
            "201": ok("Queued", r("Submitted")),
            "400": err("The document is malformed or breaks the job format"),
            "413": err("The body is too large"),
        }),
    );
    submit["requestBody"] = json!({
        "required": true,
        "content": {
            "application/json": {"schema": r("JobDocument")},
            "application/yaml": {"schema": {"type": "string"}}
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
        "openapi": "3.0.3",
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
    json!({
        "/api/jobs": {
            "get": op("List jobs, newest first", "listJobs", json!([
                {"name": "state", "in": "query", "schema": {"type": "string", "enum": state_enum}},
                {"name": "submitter", "in": "query", "schema": {"type": "string"}},
                {"name": "name", "in": "query", "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                {"name": "cursor", "in": "query", "schema": {"type": "integer", "minimum": 0}}
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
                "summary": "A job's output: stored bytes, or with follow=true server-sent events (event log: id = next offset, data = {offset, text}; event end: data = {state, offset}); resumable with offset or Last-Event-ID",
                "operationId": "jobLogs",
                "parameters": [
                    job_id,
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "follow", "in": "query", "schema": {"type": "boolean"}}
                ],
                "responses": common(json!({
                    "200": {
                        "description": "Output from the offset",
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "text/event-stream": {"schema": {"type": "string"}}
                        }
                    },
                    "400": err("Invalid query"),
                    "404": err("No such job"),
                }))
            }
        },
        "/api/runners": {
            "get": op("List runners", "listRunners", json!([]), json!({
                "200": ok("Runners", json!({"type": "object", "required": ["runners"], "properties": {"runners": {"type": "array", "items": r("Runner")}}})),
            })),
            "post": register,
        },
        "/api/runners/{id}": {
            "get": op("A runner", "getRunner", json!([runner_id.clone()]), json!({
                "200": ok("The runner", r("Runner")),
                "404": err("No such runner"),
            })),
            "delete": runner_action("Remove a runner (its running jobs are lost and retried per policy)", "deleteRunner"),
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
        },
        "/api/audit": {
            "get": op("The audit log, newest first (admin)", "listAudit", json!([
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 0}}
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
                "summary": "Prometheus metrics: OpenMetrics when asked for (Accept), else the text format 0.0.4", "operationId": "metrics", "security": [],
                "responses": {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}, "application/openmetrics-text": {"schema": {"type": "string"}}}}}
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
                        "UNAVAILABLE", "NOT_READY", "TIMEOUT", "INTERNAL_ERROR"]},
                    "message": {"type": "string"},
                    "details": {}
                }
            }}
        },
        "JobDocument": {
            "type": "object", "required": ["name", "steps"],
            "description": "A job as JOBS.md defines it",
            "properties": {
                "name": {"type": "string"},
                "steps": {"type": "array", "items": {"type": "object"}},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "secrets": {"type": "object", "additionalProperties": {"type": "string"}},
                "timeout": {"type": "string"},
                "workdir": {"type": "string"},
                "image": {"type": "string"},
                "resources": {"type": "object"},
                "runs_on": {"type": "object"},
                "retry": {"type": "object"},
                "priority": {"type": "integer"}
            }
        },
        "Submitted": {
            "type": "object", "required": ["id", "state"],
            "properties": {"id": {"type": "string"}, "state": {"type": "string", "enum": state_enum}}
        },
        "Outcome": {"type": "object", "nullable": true},
        "Attempt": {
            "type": "object", "required": ["number", "runner_id", "started_at"],
            "properties": {
                "number": {"type": "integer"},
                "runner_id": {"type": "string"},
                "started_at": {"type": "integer"},
                "ended_at": {"type": "integer", "nullable": true},
                "outcome": r("Outcome")
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
                "runner_id": {"type": "string", "nullable": true},
                "attempts": {"type": "array", "items": r("Attempt")},
                "submitted_at": {"type": "integer"},
                "finished_at": {"type": "integer", "nullable": true},
                "outcome": r("Outcome"),
                "why_pending": {"type": "string", "nullable": true}
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
                    }}
                }
            }]
        },
        "JobPage": {
            "type": "object", "required": ["jobs"],
            "properties": {
                "jobs": {"type": "array", "items": r("JobSummary")},
                "next_cursor": {"type": "integer", "nullable": true}
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
                "slots": {"type": "integer", "nullable": true},
                "capabilities": {"type": "object"},
                "startup_ms": {"type": "number", "nullable": true}
            }
        },
        "RunnerStatus": {
            "type": "object", "required": ["id", "status"],
            "properties": {
                "id": {"type": "string"}, "status": {"type": "string"},
                "health": {"type": "string"}, "running": {"type": "integer"},
                "slots": {"type": "integer", "nullable": true}
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
                "kind": {"type": "string", "enum": ["local", "native", "docker"]},
                "labels": {"type": "array", "items": {"type": "string"}},
                "reserved_labels": {"type": "array", "items": {"type": "string"}},
                "slots": {"type": "integer", "minimum": 1, "maximum": 1024}
            }
        },
        "TokenRequest": {
            "type": "object", "additionalProperties": false,
            "properties": {
                "ttl_seconds": {"type": "integer", "minimum": 1, "maximum": 2592000},
                "labels": {"type": "array", "items": {"type": "string"}}
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
                        "target": {"type": "string", "nullable": true},
                        "result": {"type": "string"},
                        "request_id": {"type": "string", "nullable": true}
                    }
                }},
                "next_before": {"type": "integer", "nullable": true}
            }
        }
    })
}

//! Loading job documents: a position-aware tree first, then a walk that collects every
//! problem (unknown fields, wrong types, broken rules) with its path, line and column.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use super::units::{parse_duration, parse_size};
use super::{
    Job, MAX_RETRIES, MAX_SCRIPT_BYTES, MAX_STEPS, Resources, RetryPolicy, RetryWhen, RunsOn, Step,
    StepAction,
};
use crate::runner::RunnerKind;

/// One problem in a job document.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ValidationError {
    /// Field path such as `steps[2].timeout`; empty for the document itself.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// 1-based line and column in the source document, when known.
    pub position: Option<(u64, u64)>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)?;
        } else {
            write!(f, "{}: {}", self.path, self.message)?;
        }
        if let Some((line, column)) = self.position {
            write!(f, " (line {line}, column {column})")?;
        }
        Ok(())
    }
}

/// Every problem found in a job document, in document order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidationErrors(Vec<ValidationError>);

impl ValidationErrors {
    pub(crate) fn push(&mut self, path: &str, message: String, position: Option<(u64, u64)>) {
        self.0.push(ValidationError {
            path: path.to_string(),
            message,
            position,
        });
    }

    pub(crate) fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }

    /// The problems, in document order.
    pub fn errors(&self) -> &[ValidationError] {
        &self.0
    }

    /// Number of problems.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there is no problem.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A single problem not tied to a field.
    pub fn single(message: impl Into<String>) -> Self {
        ValidationErrors(vec![ValidationError {
            path: String::new(),
            message: message.into(),
            position: None,
        }])
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// A YAML node with its position.
type SNode = Spanned<Node>;

enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<SNode>),
    Map(Vec<(Spanned<String>, SNode)>),
}

impl Node {
    fn type_name(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "a boolean",
            Node::Int(_) => "an integer",
            Node::Float(_) => "a number",
            Node::Str(_) => "a string",
            Node::Seq(_) => "a list",
            Node::Map(_) => "a mapping",
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NodeVisitor;
        impl<'de> Visitor<'de> for NodeVisitor {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
                i64::try_from(v)
                    .map(Node::Int)
                    .map_err(|_| E::custom("integer is too large"))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Node, E> {
                i64::try_from(v)
                    .map(Node::Int)
                    .map_err(|_| E::custom("integer is too large"))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
                i64::try_from(v)
                    .map(Node::Int)
                    .map_err(|_| E::custom("integer is too large"))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
                Ok(Node::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Str(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Node, E> {
                Ok(Node::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<SNode>()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    let value = map.next_value::<SNode>()?;
                    entries.push((key, value));
                }
                Ok(Node::Map(entries))
            }
        }
        d.deserialize_any(NodeVisitor)
    }
}

fn pos_of<T>(s: &Spanned<T>) -> Option<(u64, u64)> {
    let loc = s.referenced;
    (loc.line() > 0).then(|| (loc.line(), loc.column()))
}

/// Walks the tree, converting it to a `Job` and recording every problem.
struct Walker {
    errors: ValidationErrors,
    positions: HashMap<String, (u64, u64)>,
}

impl Walker {
    fn error(&mut self, path: &str, message: impl Into<String>, at: Option<(u64, u64)>) {
        self.errors.push(path, message.into(), at);
    }

    fn note(&mut self, path: &str, node: &SNode) {
        if let Some(p) = pos_of(node) {
            self.positions.insert(path.to_string(), p);
        }
    }

    /// Iterates a mapping, reporting unknown keys; calls `field` for known ones.
    fn map<'a>(
        &mut self,
        path: &str,
        node: &'a SNode,
        known: &[&str],
    ) -> Vec<(&'a str, &'a SNode)> {
        self.note(path, node);
        let Node::Map(entries) = &node.value else {
            if !matches!(node.value, Node::Null) || path.is_empty() {
                self.error(
                    path,
                    format!("expected a mapping, found {}", node.value.type_name()),
                    pos_of(node),
                );
            }
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, value) in entries {
            let child = join(path, &key.value);
            if known.contains(&key.value.as_str()) {
                self.note(&child, value);
                out.push((key.value.as_str(), value));
            } else {
                self.error(
                    &child,
                    format!("unknown field (expected one of: {})", known.join(", ")),
                    pos_of(key),
                );
            }
        }
        out
    }

    fn string(&mut self, path: &str, node: &SNode) -> Option<String> {
        match &node.value {
            Node::Str(s) => Some(s.clone()),
            other => {
                self.error(
                    path,
                    format!("expected a string, found {}", other.type_name()),
                    pos_of(node),
                );
                None
            }
        }
    }

    /// A string, or a scalar number/boolean turned into its text (for env values).
    fn scalar_text(&mut self, path: &str, node: &SNode) -> Option<String> {
        match &node.value {
            Node::Str(s) => Some(s.clone()),
            Node::Int(i) => Some(i.to_string()),
            Node::Float(f) => Some(f.to_string()),
            Node::Bool(b) => Some(b.to_string()),
            other => {
                self.error(
                    path,
                    format!("expected a string, found {}", other.type_name()),
                    pos_of(node),
                );
                None
            }
        }
    }

    fn duration(&mut self, path: &str, node: &SNode) -> Option<Duration> {
        let text = self.string(path, node)?;
        match parse_duration(&text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.error(path, e, pos_of(node));
                None
            }
        }
    }

    fn size(&mut self, path: &str, node: &SNode) -> Option<u64> {
        match &node.value {
            Node::Int(i) if *i >= 0 => Some(*i as u64),
            // JSON has one number type: 512.0 is the integer 512.
            Node::Float(f) if integral(*f) && *f >= 0.0 => Some(*f as u64),
            Node::Str(s) => match parse_size(s) {
                Ok(v) => Some(v),
                Err(e) => {
                    self.error(path, e, pos_of(node));
                    None
                }
            },
            other => {
                self.error(
                    path,
                    format!(
                        "expected a size such as 512Mi, found {}",
                        if matches!(other, Node::Int(_)) {
                            "a negative integer"
                        } else {
                            other.type_name()
                        }
                    ),
                    pos_of(node),
                );
                None
            }
        }
    }

    fn integer(&mut self, path: &str, node: &SNode) -> Option<i64> {
        match &node.value {
            Node::Int(i) => Some(*i),
            Node::Float(f) if integral(*f) => Some(*f as i64),
            other => {
                self.error(
                    path,
                    format!("expected an integer, found {}", other.type_name()),
                    pos_of(node),
                );
                None
            }
        }
    }

    fn unsigned(&mut self, path: &str, node: &SNode) -> Option<u64> {
        let i = self.integer(path, node)?;
        if i < 0 {
            self.error(path, "must not be negative", pos_of(node));
            return None;
        }
        Some(i as u64)
    }

    fn boolean(&mut self, path: &str, node: &SNode) -> Option<bool> {
        match &node.value {
            Node::Bool(b) => Some(*b),
            other => {
                self.error(
                    path,
                    format!("expected true or false, found {}", other.type_name()),
                    pos_of(node),
                );
                None
            }
        }
    }

    fn seq<'a>(&mut self, path: &str, node: &'a SNode) -> &'a [SNode] {
        match &node.value {
            Node::Seq(items) => items,
            other => {
                self.error(
                    path,
                    format!("expected a list, found {}", other.type_name()),
                    pos_of(node),
                );
                &[]
            }
        }
    }

    fn string_map(&mut self, path: &str, node: &SNode) -> BTreeMap<String, String> {
        self.note(path, node);
        let mut out = BTreeMap::new();
        match &node.value {
            Node::Map(entries) => {
                for (key, value) in entries {
                    let child = join(path, &key.value);
                    self.note(&child, value);
                    // Key positions point at the name, which is what env-name errors are about.
                    if let Some(p) = pos_of(key) {
                        self.positions.insert(format!("{child}#key"), p);
                    }
                    if let Some(v) = self.scalar_text(&child, value) {
                        out.insert(key.value.clone(), v);
                    }
                }
            }
            Node::Null => {}
            other => self.error(
                path,
                format!("expected a mapping, found {}", other.type_name()),
                pos_of(node),
            ),
        }
        out
    }

    fn step(&mut self, path: &str, node: &SNode) -> Step {
        let mut step = Step::run(String::new());
        let mut run = None;
        let mut command = None;
        let fields = self.map(
            path,
            node,
            &[
                "name",
                "run",
                "command",
                "timeout",
                "continue_on_error",
                "env",
            ],
        );
        for (key, value) in fields {
            let child = join(path, key);
            match key {
                "name" => step.name = self.string(&child, value),
                "run" => run = Some(self.string(&child, value).unwrap_or_default()),
                "command" => {
                    let items = self.seq(&child, value);
                    let mut argv = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        let p = format!("{child}[{i}]");
                        self.note(&p, item);
                        if let Some(s) = self.scalar_text(&p, item) {
                            argv.push(s);
                        }
                    }
                    command = Some(argv);
                }
                "timeout" => step.timeout = self.duration(&child, value),
                "continue_on_error" => {
                    step.continue_on_error = self.boolean(&child, value).unwrap_or(false)
                }
                "env" => step.env = self.string_map(&child, value),
                _ => unreachable!("map() only returns known keys"),
            }
        }
        match (run, command) {
            (Some(script), None) => step.action = StepAction::Run(script),
            (None, Some(argv)) => step.action = StepAction::Command(argv),
            (Some(_), Some(_)) => self.error(
                path,
                "has both `run` and `command`; a step needs exactly one",
                pos_of(node),
            ),
            (None, None) => match node.value {
                Node::Map(_) => self.error(
                    path,
                    "has neither `run` nor `command`; a step needs exactly one",
                    pos_of(node),
                ),
                // `- ` with nothing after it: not a step to run `""`.
                Node::Null => self.error(
                    path,
                    "is empty; a step needs exactly one of `run` and `command`",
                    pos_of(node),
                ),
                // Anything else was reported by `map` as not a mapping.
                _ => {}
            },
        }
        step
    }

    fn job(&mut self, root: &SNode) -> Job {
        let mut job = Job::new(String::new(), Vec::new());
        let fields = self.map(
            "",
            root,
            &[
                "name",
                "steps",
                "env",
                "secrets",
                "timeout",
                "workdir",
                "image",
                "resources",
                "runs_on",
                "priority",
                "retry",
            ],
        );
        let mut saw_name = false;
        let mut saw_steps = false;
        for (key, value) in fields {
            let path = key;
            match key {
                "name" => {
                    saw_name = true;
                    job.name = self.string(path, value).unwrap_or_default();
                }
                "steps" => {
                    saw_steps = true;
                    let items = self.seq(path, value);
                    for (i, item) in items.iter().enumerate() {
                        let p = format!("steps[{i}]");
                        job.steps.push(self.step(&p, item));
                    }
                }
                "env" => job.env = self.string_map(path, value),
                "secrets" => job.secrets = self.string_map(path, value),
                "timeout" => job.timeout = self.duration(path, value),
                "workdir" => job.workdir = self.string(path, value),
                "image" => job.image = self.string(path, value),
                "resources" => job.resources = self.resources(path, value),
                "runs_on" => job.runs_on = self.runs_on(path, value),
                "priority" => {
                    if let Some(i) = self.integer(path, value) {
                        match i32::try_from(i) {
                            Ok(p) => job.priority = p,
                            Err(_) => self.error(path, "is out of range", pos_of(value)),
                        }
                    }
                }
                "retry" => job.retry = self.retry(path, value),
                _ => unreachable!("map() only returns known keys"),
            }
        }
        if matches!(root.value, Node::Map(_)) {
            if !saw_name {
                self.error("name", "is required", None);
            }
            if !saw_steps {
                self.error("steps", "is required", None);
            }
        }
        job
    }

    fn resources(&mut self, path: &str, node: &SNode) -> Resources {
        let mut r = Resources::default();
        let fields = self.map(
            path,
            node,
            &[
                "cpus",
                "memory",
                "pids",
                "cpu_time",
                "open_files",
                "file_size",
            ],
        );
        for (key, value) in fields {
            let child = join(path, key);
            match key {
                "cpus" => {
                    r.cpus = match &value.value {
                        Node::Int(i) => Some(*i as f64),
                        Node::Float(f) => Some(*f),
                        Node::Str(s) => match s.parse::<f64>() {
                            Ok(f) => Some(f),
                            Err(_) => {
                                self.error(
                                    &child,
                                    format!("{s:?} is not a number of CPUs"),
                                    pos_of(value),
                                );
                                None
                            }
                        },
                        other => {
                            self.error(
                                &child,
                                format!("expected a number, found {}", other.type_name()),
                                pos_of(value),
                            );
                            None
                        }
                    }
                }
                "memory" => r.memory = self.size(&child, value),
                "pids" => r.pids = self.unsigned(&child, value),
                "cpu_time" => r.cpu_time = self.duration(&child, value),
                "open_files" => r.open_files = self.unsigned(&child, value),
                "file_size" => r.file_size = self.size(&child, value),
                _ => unreachable!(),
            }
        }
        r
    }

    fn runs_on(&mut self, path: &str, node: &SNode) -> RunsOn {
        let mut r = RunsOn::default();
        for (key, value) in self.map(path, node, &["kind", "labels"]) {
            let child = join(path, key);
            match key {
                "kind" => {
                    if let Some(s) = self.string(&child, value) {
                        match s.parse::<RunnerKind>() {
                            Ok(k) => r.kind = Some(k),
                            Err(e) => self.error(&child, e, pos_of(value)),
                        }
                    }
                }
                "labels" => {
                    for (i, item) in self.seq(&child, value).iter().enumerate() {
                        let p = format!("{child}[{i}]");
                        self.note(&p, item);
                        if let Some(s) = self.string(&p, item) {
                            r.labels.push(s);
                        }
                    }
                }
                _ => unreachable!(),
            }
        }
        r
    }

    fn retry(&mut self, path: &str, node: &SNode) -> RetryPolicy {
        let mut r = RetryPolicy::default();
        for (key, value) in self.map(path, node, &["max", "when"]) {
            let child = join(path, key);
            match key {
                "max" => {
                    if let Some(n) = self.unsigned(&child, value) {
                        r.max = u32::try_from(n).unwrap_or(u32::MAX);
                    }
                }
                "when" => {
                    r.when.clear();
                    for (i, item) in self.seq(&child, value).iter().enumerate() {
                        let p = format!("{child}[{i}]");
                        self.note(&p, item);
                        let Some(s) = self.string(&p, item) else {
                            continue;
                        };
                        let parsed = [
                            RetryWhen::Failure,
                            RetryWhen::Timeout,
                            RetryWhen::RunnerFailure,
                            RetryWhen::Lost,
                        ]
                        .into_iter()
                        .find(|w| w.as_str() == s);
                        match parsed {
                            Some(w) => r.when.push(w),
                            None => self.error(
                                &p,
                                format!(
                                    "unknown retry cause {s:?} (expected failure, timeout, runner_failure or lost)"
                                ),
                                pos_of(item),
                            ),
                        }
                    }
                }
                _ => unreachable!(),
            }
        }
        r
    }
}

/// True for a float that is a whole number an `i64` holds exactly.
fn integral(f: f64) -> bool {
    f.is_finite() && f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

pub(super) fn parse_document(text: &str) -> Result<Job, ValidationErrors> {
    let root: SNode = match serde_saphyr::from_str(text) {
        Ok(root) => root,
        Err(e) => {
            let position = e.location().map(|l| (l.line(), l.column()));
            let mut message = e.to_string();
            // The library's message may repeat the position or a source excerpt; keep its
            // first line, which says what is wrong.
            if let Some(first) = message.lines().next() {
                message = first.to_string();
            }
            let mut errors = ValidationErrors::default();
            errors.push(
                "",
                format!("not a valid YAML or JSON document: {message}"),
                position,
            );
            return Err(errors);
        }
    };
    let mut walker = Walker {
        errors: ValidationErrors::default(),
        positions: HashMap::new(),
    };
    let job = walker.job(&root);
    let Walker {
        mut errors,
        positions,
    } = walker;
    // Rules on values are checked only where the value itself was well-formed, so that one
    // mistake gives one message.
    let structural: Vec<String> = errors.0.iter().map(|e| e.path.clone()).collect();
    check_semantics(&job, &mut |path, message| {
        if structural.iter().any(|p| p == path) {
            return;
        }
        let position = positions
            .get(&format!("{path}#key"))
            .or_else(|| positions.get(path))
            .copied();
        errors.push(path, message, position);
    });
    errors
        .0
        .sort_by_key(|e| e.position.unwrap_or((u64::MAX, 0)));
    errors.into_result().map(|()| job)
}

fn valid_job_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// True when `name` is a valid environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub(crate) fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn valid_label(label: &str) -> bool {
    (1..=128).contains(&label.len())
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/' | '='))
}

/// The rules on values, shared by documents and jobs built in code.
pub(crate) fn check_semantics(job: &Job, report: &mut dyn FnMut(&str, String)) {
    if !valid_job_name(&job.name) {
        report(
            "name",
            format!(
                "{:?} is not a valid job name (1-128 characters of A-Z a-z 0-9 . _ -)",
                job.name
            ),
        );
    }
    if job.steps.is_empty() || job.steps.len() > MAX_STEPS {
        report(
            "steps",
            format!(
                "a job needs 1 to {MAX_STEPS} steps, found {}",
                job.steps.len()
            ),
        );
    }
    check_env(job, "env", &job.env, report);
    check_env(job, "secrets", &job.secrets, report);
    if job.timeout == Some(Duration::ZERO) {
        report("timeout", "must be greater than 0s".into());
    }
    if let Some(workdir) = &job.workdir {
        let p = std::path::Path::new(workdir);
        if workdir.is_empty() {
            report("workdir", "must not be empty".into());
        } else if p.is_absolute() {
            report(
                "workdir",
                format!("{workdir:?} must be relative to the workspace"),
            );
        } else if p
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            report("workdir", format!("{workdir:?} must not contain \"..\""));
        } else if workdir.contains('\0') {
            report("workdir", "must not contain NUL bytes".into());
        }
    }
    if let Some(image) = &job.image
        && image.trim().is_empty()
    {
        report("image", "must not be empty".into());
    }
    for (i, step) in job.steps.iter().enumerate() {
        let path = format!("steps[{i}]");
        if let Some(name) = &step.name
            && (name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control))
        {
            report(
                &format!("{path}.name"),
                "must be 1-128 characters without control characters".into(),
            );
        }
        match &step.action {
            StepAction::Run(script) => {
                if script.len() > MAX_SCRIPT_BYTES {
                    report(
                        &format!("{path}.run"),
                        format!(
                            "script is {} bytes; the limit is {MAX_SCRIPT_BYTES}",
                            script.len()
                        ),
                    );
                }
                if script.contains('\0') {
                    report(&format!("{path}.run"), "must not contain NUL bytes".into());
                }
            }
            StepAction::Command(argv) => {
                if argv.is_empty() || argv[0].is_empty() {
                    report(
                        &format!("{path}.command"),
                        "must name a program as its first element".into(),
                    );
                }
                for (j, arg) in argv.iter().enumerate() {
                    if arg.contains('\0') {
                        report(
                            &format!("{path}.command[{j}]"),
                            "must not contain NUL bytes".into(),
                        );
                    }
                }
            }
        }
        if step.timeout == Some(Duration::ZERO) {
            report(&format!("{path}.timeout"), "must be greater than 0s".into());
        }
        check_env(job, &format!("{path}.env"), &step.env, report);
    }
    let r = &job.resources;
    if let Some(cpus) = r.cpus
        && !(cpus.is_finite() && cpus > 0.0 && cpus <= 4096.0)
    {
        report(
            "resources.cpus",
            format!("{cpus} is not a CPU count between 0 and 4096"),
        );
    }
    for (name, value) in [
        ("memory", r.memory),
        ("pids", r.pids),
        ("open_files", r.open_files),
        ("file_size", r.file_size),
    ] {
        if value == Some(0) {
            report(
                &format!("resources.{name}"),
                "must be greater than 0".into(),
            );
        }
    }
    if r.cpu_time == Some(Duration::ZERO) {
        report("resources.cpu_time", "must be greater than 0s".into());
    }
    for (i, label) in job.runs_on.labels.iter().enumerate() {
        if !valid_label(label) {
            report(
                &format!("runs_on.labels[{i}]"),
                format!(
                    "{label:?} is not a valid label (1-128 characters of A-Z a-z 0-9 . _ - : / =)"
                ),
            );
        }
    }
    if job.retry.max > MAX_RETRIES {
        report(
            "retry.max",
            format!(
                "{} is more than the {MAX_RETRIES} retries allowed",
                job.retry.max
            ),
        );
    }
}

fn check_env(
    _job: &Job,
    path: &str,
    vars: &BTreeMap<String, String>,
    report: &mut dyn FnMut(&str, String),
) {
    for (name, value) in vars {
        let child = join(path, name);
        if !valid_env_name(name) {
            report(
                &child,
                format!("{name:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"),
            );
        } else if name == "RUSTCI" || name.starts_with("RUSTCI_") {
            // The runner's own variables: `RUSTCI_JOB_ID` is how a job's processes are
            // found and stopped after a crash, so a job may not set it to something else.
            report(
                &child,
                format!("{name:?} is reserved: the runner sets RUSTCI and RUSTCI_* itself"),
            );
        } else if value.contains('\0') {
            report(&child, "value must not contain NUL bytes".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_step_is_an_error_not_an_empty_script() {
        let e = parse_document("name: e\nsteps:\n  - run: echo hi\n  -\n").unwrap_err();
        assert_eq!(e.errors().len(), 1, "{e}");
        assert_eq!(e.errors()[0].path, "steps[1]");
        assert!(e.errors()[0].message.contains("is empty"), "{e}");
        let e = parse_document(r#"{"name": "e", "steps": [null]}"#).unwrap_err();
        assert_eq!(e.errors()[0].path, "steps[0]", "{e}");
    }

    #[test]
    fn step_names_are_counted_in_characters_as_their_message_says() {
        let name = "é".repeat(128);
        let ok = format!("name: job\nsteps:\n  - run: echo\n    name: {name}\n");
        assert!(
            parse_document(&ok).is_ok(),
            "128 characters (256 bytes) refused"
        );
        let long = format!("name: job\nsteps:\n  - run: echo\n    name: {name}é\n");
        let e = parse_document(&long).unwrap_err();
        assert_eq!(e.errors()[0].path, "steps[0].name", "{e}");
    }

    #[test]
    fn the_runners_own_variables_are_reserved() {
        let e = parse_document(
            "name: r\nenv: {RUSTCI_JOB_ID: x}\nsecrets: {RUSTCI: y}\nsteps:\n  - run: echo\n    env: {RUSTCI_RUNNER: z}\n",
        )
        .unwrap_err();
        let paths: Vec<&str> = e.errors().iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "env.RUSTCI_JOB_ID",
                "secrets.RUSTCI",
                "steps[0].env.RUSTCI_RUNNER"
            ],
            "{e}"
        );
        assert!(e.errors()[0].message.contains("reserved"), "{e}");
    }

    #[test]
    fn whole_floats_are_integers_and_fractions_are_not() {
        let job = parse_document(
            r#"{"name": "f", "priority": 3.0, "resources": {"pids": 64.0, "memory": 1024.0},
                "retry": {"max": 2.0}, "steps": [{"run": "true"}]}"#,
        )
        .unwrap();
        assert_eq!(job.priority, 3);
        assert_eq!(job.resources.pids, Some(64));
        assert_eq!(job.resources.memory, Some(1024));
        assert_eq!(job.retry.max, 2);
        let e = parse_document(
            r#"{"name": "f", "resources": {"pids": 6.5}, "steps": [{"run": "true"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.errors()[0].path, "resources.pids");
    }

    #[test]
    fn full_document_loads() {
        let text = r#"
name: build-and-test
steps:
  - name: compile
    run: |
      echo "building $APP"
  - name: version
    command: ["/usr/bin/env", "uname", "-r"]
    timeout: 30s
    continue_on_error: false
    env: {STEP_ONLY: "1"}
env:
  APP: demo
  COUNT: 3
secrets:
  API_TOKEN: s3cr3t-value
timeout: 30m
workdir: src
image: rustci-busybox:local
resources: {cpus: 1.5, memory: 512Mi, pids: 256}
runs_on:
  kind: native
  labels: [linux, x86_64]
priority: 5
retry: {max: 2, when: [runner_failure, lost, timeout]}
"#;
        let job = Job::from_yaml(text).unwrap();
        assert_eq!(job.name, "build-and-test");
        assert_eq!(job.steps.len(), 2);
        assert_eq!(
            job.steps[0].action,
            StepAction::Run("echo \"building $APP\"\n".into())
        );
        assert_eq!(
            job.steps[1].action,
            StepAction::Command(vec!["/usr/bin/env".into(), "uname".into(), "-r".into()])
        );
        assert_eq!(job.steps[1].timeout, Some(Duration::from_secs(30)));
        assert_eq!(job.env["COUNT"], "3");
        assert_eq!(job.timeout, Some(Duration::from_secs(1800)));
        assert_eq!(job.resources.memory, Some(512 << 20));
        assert_eq!(job.resources.cpus, Some(1.5));
        assert_eq!(job.runs_on.kind, Some(RunnerKind::Native));
        assert_eq!(job.priority, 5);
        assert_eq!(job.retry.max, 2);
        assert_eq!(job.retry.when.len(), 3);
        assert!(!format!("{job:?}").contains("s3cr3t"));

        // The same job survives a JSON round trip through serde.
        let json = serde_json::to_string(&job).unwrap();
        let back: Job = serde_json::from_str(&json).unwrap();
        assert_eq!(back, job);
        // And the JSON text loads through the validating loader too.
        assert_eq!(Job::from_json(&json).unwrap(), job);
    }

    #[test]
    fn every_problem_is_reported_with_path_and_position() {
        let text = "name: bad name!\nsteps:\n  - run: echo\n    timeout: 0s\n  - command: []\n  - run: a\n    command: [b]\n  - {}\nenv:\n  1BAD: x\ntimeout: 0s\nworkdir: ../up\ncolour: red\n";
        let errors = Job::from_yaml(text).unwrap_err();
        let by_path: HashMap<&str, &ValidationError> = errors
            .errors()
            .iter()
            .map(|e| (e.path.as_str(), e))
            .collect();
        let expect = [
            ("name", 1),
            ("steps[0].timeout", 4),
            ("steps[1].command", 5),
            ("steps[2]", 6),
            ("steps[3]", 8),
            ("env.1BAD", 10),
            ("timeout", 11),
            ("workdir", 12),
            ("colour", 13),
        ];
        for (path, line) in expect {
            let e = by_path
                .get(path)
                .unwrap_or_else(|| panic!("no error for {path}: {errors}"));
            assert_eq!(e.position.map(|p| p.0), Some(line), "{e}");
        }
        assert_eq!(errors.len(), expect.len(), "{errors}");
    }

    #[test]
    fn wrong_types_and_missing_fields() {
        let errors =
            Job::from_yaml("steps: 5\npriority: high\nresources: {memory: lots}\n").unwrap_err();
        let text = errors.to_string();
        assert!(text.contains("name: is required"), "{text}");
        assert!(
            text.contains("steps: expected a list, found an integer (line 1"),
            "{text}"
        );
        assert!(text.contains("priority: expected an integer"), "{text}");
        assert!(text.contains("resources.memory: size \"lots\""), "{text}");
    }

    #[test]
    fn syntax_errors_carry_positions() {
        let errors = Job::from_yaml("name: x\nsteps: [\n").unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(errors.errors()[0].position.is_some(), "{errors}");
        let errors =
            Job::from_json("{\"name\": \"x\", \"steps\": [{\"run\": \"a\"}], \"bogus\": 1}")
                .unwrap_err();
        assert_eq!(errors.errors()[0].path, "bogus");
        assert_eq!(errors.errors()[0].position.map(|p| p.0), Some(1));
    }

    #[test]
    fn limits() {
        let steps: String = (0..101).map(|_| "  - run: x\n").collect();
        let errors = Job::from_yaml(&format!("name: many\nsteps:\n{steps}")).unwrap_err();
        assert!(errors.to_string().contains("1 to 100 steps, found 101"));
        let big = "x".repeat(MAX_SCRIPT_BYTES + 1);
        let job = Job::new("big", vec![Step::run(big)]);
        assert!(
            job.validate()
                .unwrap_err()
                .to_string()
                .contains("steps[0].run")
        );
        let job = Job::new("abs", vec![Step::run("true")]).with_workdir("/etc");
        assert!(job.validate().is_err());
        assert!(Job::new("ok", vec![Step::run("true")]).validate().is_ok());
    }
}

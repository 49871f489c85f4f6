//! Label selectors (`app=web,tier!=db,env in (a,b),!legacy`) and the field selectors the
//! fake supports (`metadata.name`, `metadata.namespace`, `status.phase`, `spec.nodeName`).

use std::collections::BTreeMap;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    /// `k=v` / `k==v`
    Equals(String, String),
    /// `k!=v`: true when the label is absent too.
    NotEquals(String, String),
    /// `k in (a,b)`
    In(String, Vec<String>),
    /// `k notin (a,b)`: true when the label is absent too.
    NotIn(String, Vec<String>),
    /// `k`
    Exists(String),
    /// `!k`
    DoesNotExist(String),
}

/// A parsed label selector: every requirement must hold (comma = AND). Empty = everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Parses the `labelSelector` query parameter; the error is the message of a 400.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text)? {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(part)?);
        }
        Ok(LabelSelector { requirements })
    }

    /// Whether `labels` satisfy every requirement.
    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!(
                        "unable to parse requirement: unexpected ')' in {text:?}"
                    ));
                }
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!(
            "unable to parse requirement: unclosed '(' in {text:?}"
        ));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn check_key(key: &str, whole: &str) -> Result<String, String> {
    let valid = !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if valid {
        Ok(key.to_string())
    } else {
        Err(format!(
            "unable to parse requirement: invalid label key {key:?} in {whole:?}"
        ))
    }
}

fn check_value(value: &str, whole: &str) -> Result<String, String> {
    let valid = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(value.to_string())
    } else {
        Err(format!(
            "unable to parse requirement: invalid label value {value:?} in {whole:?}"
        ))
    }
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(check_key(key.trim(), part)?));
    }
    if let Some((k, v)) = part.split_once("!=") {
        return Ok(Requirement::NotEquals(
            check_key(k.trim(), part)?,
            check_value(v.trim(), part)?,
        ));
    }
    if let Some((k, v)) = part.split_once("==") {
        return Ok(Requirement::Equals(
            check_key(k.trim(), part)?,
            check_value(v.trim(), part)?,
        ));
    }
    if let Some((k, v)) = part.split_once('=') {
        return Ok(Requirement::Equals(
            check_key(k.trim(), part)?,
            check_value(v.trim(), part)?,
        ));
    }
    if let Some(open) = part.find('(') {
        let head = part[..open].trim();
        let Some(body) = part[open + 1..].trim_end().strip_suffix(')') else {
            return Err(format!("unable to parse requirement: {part:?}"));
        };
        let values = body
            .split(',')
            .map(|v| check_value(v.trim(), part))
            .collect::<Result<Vec<_>, _>>()?;
        let mut words = head.split_whitespace();
        let (Some(key), Some(op), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("unable to parse requirement: {part:?}"));
        };
        let key = check_key(key, part)?;
        return match op {
            "in" => Ok(Requirement::In(key, values)),
            "notin" => Ok(Requirement::NotIn(key, values)),
            _ => Err(format!(
                "unable to parse requirement: unknown operator {op:?} in {part:?}"
            )),
        };
    }
    Ok(Requirement::Exists(check_key(part.trim(), part)?))
}

/// The fields of an object that field selectors can look at.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Fields {
    /// `metadata.name`
    pub name: String,
    /// `metadata.namespace`
    pub namespace: String,
    /// `metadata.labels`, for label selectors.
    pub labels: BTreeMap<String, String>,
    /// `status.phase` (pods only)
    pub phase: Option<String>,
    /// `spec.nodeName` (pods only)
    pub node_name: Option<String>,
}

/// A parsed field selector: `field=value`, `field==value`, `field!=value`, comma = AND.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FieldSelector {
    terms: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses the `fieldSelector` query parameter; the error is the message of a 400.
    pub(crate) fn parse(text: &str, pods: bool) -> Result<Self, String> {
        let mut terms = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{part}'; can't understand '{part}'"
                ));
            };
            let field = field.trim();
            let known = matches!(field, "metadata.name" | "metadata.namespace")
                || (pods && matches!(field, "status.phase" | "spec.nodeName"));
            if !known {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector { terms })
    }

    /// Whether the object's fields satisfy every term.
    pub(crate) fn matches(&self, fields: &Fields) -> bool {
        self.terms.iter().all(|(field, equal, value)| {
            let actual = match field.as_str() {
                "metadata.name" => fields.name.as_str(),
                "metadata.namespace" => fields.namespace.as_str(),
                "status.phase" => fields.phase.as_deref().unwrap_or(""),
                "spec.nodeName" => fields.node_name.as_deref().unwrap_or(""),
                _ => "",
            };
            (actual == value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selectors() {
        let l = labels(&[("app", "web"), ("tier", "front"), ("rustci.io/job", "j1")]);
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app in (web,db)", true),
            ("app in (db)", false),
            ("app notin (db, x)", true),
            ("missing notin (db)", true),
            ("missing in (db)", false),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("rustci.io/job=j1, app in (a,web)", true),
        ] {
            let s = LabelSelector::parse(sel).unwrap();
            assert_eq!(s.matches(&l), want, "{sel}");
        }
        for bad in ["app in (a", "a b", "app=(x)", "=x"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn field_selectors() {
        let f = Fields {
            name: "p".into(),
            namespace: "ns".into(),
            labels: BTreeMap::new(),
            phase: Some("Running".into()),
            node_name: None,
        };
        assert!(
            FieldSelector::parse("metadata.name=p", true)
                .unwrap()
                .matches(&f)
        );
        assert!(
            !FieldSelector::parse("metadata.name=q", true)
                .unwrap()
                .matches(&f)
        );
        assert!(
            FieldSelector::parse("status.phase=Running,metadata.namespace==ns", true)
                .unwrap()
                .matches(&f)
        );
        assert!(
            FieldSelector::parse("status.phase!=Running", true)
                .unwrap()
                .matches(&f)
                .eq(&false)
        );
        assert!(FieldSelector::parse("spec.foo=x", true).is_err());
        assert!(FieldSelector::parse("status.phase=x", false).is_err());
    }
}

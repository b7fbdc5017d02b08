//! Rendering `deploy/daemon/fly.toml.tmpl` for one user into a `CreateMachineRequest`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use machines::types::CreateMachineRequest;

/// A value put in place of a placeholder.
#[derive(Clone, Debug)]
pub enum Value {
    /// Escaped for a TOML basic string; the template puts the quotes around it.
    Text(String),
    /// Written as is.
    Number(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("reading the machine template {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("line {line}: unknown placeholder {{{{{name}}}}}")]
    UnknownPlaceholder { name: String, line: usize },
    #[error("line {line}: a placeholder is opened with {{{{ and never closed")]
    Unclosed { line: usize },
    #[error("the rendered template is not valid TOML")]
    Toml(#[source] toml::de::Error),
    #[error("the rendered template is not a machine create request")]
    Shape(#[source] serde_json::Error),
}

/// The template text, read once at start.
#[derive(Clone, Debug)]
pub struct MachineTemplate {
    text: String,
}

impl MachineTemplate {
    pub fn load(path: &Path) -> Result<Self, TemplateError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TemplateError::Read { path: path.to_owned(), source })?;
        Ok(Self { text })
    }

    pub fn from_text(text: impl Into<String>) -> Self {
        Self { text: text.into() }
    }

    /// Renders the template for a made-up user, so a template that cannot make a machine
    /// stops the router at start instead of failing every user's first request.
    pub fn check(&self) -> Result<(), TemplateError> {
        let values = BTreeMap::from([
            ("image", Value::Text("registry.example/daemon:check".into())),
            ("region", Value::Text("ams".into())),
            ("machine_name", Value::Text("matrix-check".into())),
            ("user_id", Value::Text(uuid::Uuid::nil().to_string())),
            ("volume_id", Value::Text("vol_check".into())),
            ("daemon_token", Value::Text("check".into())),
            ("daemon_port", Value::Number(8080)),
        ]);
        self.render(&values).map(drop)
    }

    /// The rendered TOML text (what a snapshot test compares).
    pub fn render_text(&self, values: &BTreeMap<&str, Value>) -> Result<String, TemplateError> {
        let mut out = String::with_capacity(self.text.len());
        for (index, line) in self.text.lines().enumerate() {
            // Comments may mention placeholders; they are documentation, not input.
            if line.trim_start().starts_with('#') {
                out.push_str(line);
            } else {
                render_line(line, index + 1, values, &mut out)?;
            }
            out.push('\n');
        }
        Ok(out)
    }

    /// The request Fly receives.
    pub fn render(
        &self,
        values: &BTreeMap<&str, Value>,
    ) -> Result<CreateMachineRequest, TemplateError> {
        let text = self.render_text(values)?;
        let toml: toml::Value = toml::from_str(&text).map_err(TemplateError::Toml)?;
        let json = serde_json::to_value(toml).map_err(TemplateError::Shape)?;
        serde_json::from_value(json).map_err(TemplateError::Shape)
    }
}

fn render_line(
    line: &str,
    number: usize,
    values: &BTreeMap<&str, Value>,
    out: &mut String,
) -> Result<(), TemplateError> {
    let mut rest = line;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(TemplateError::Unclosed { line: number });
        };
        let name = after[..end].trim();
        match values.get(name) {
            Some(Value::Text(text)) => escape_into(text, out),
            Some(Value::Number(n)) => out.push_str(&n.to_string()),
            None => {
                return Err(TemplateError::UnknownPlaceholder {
                    name: name.to_owned(),
                    line: number,
                })
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(())
}

/// Escapes for the inside of a TOML basic string.
fn escape_into(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> BTreeMap<&'static str, Value> {
        BTreeMap::from([
            ("image", Value::Text("registry.example/matrix/daemon:v1".into())),
            ("region", Value::Text("ams".into())),
            ("machine_name", Value::Text("matrix-3f1c".into())),
            ("user_id", Value::Text("3f1c8a52-7d43-4d0e-9b5e-2f6a1c9d0e11".into())),
            ("volume_id", Value::Text("vol_0123456789abcdef".into())),
            ("daemon_token", Value::Text("tok\"en".into())),
            ("daemon_port", Value::Number(8080)),
        ])
    }

    #[test]
    fn errors_name_the_placeholder() {
        let err = MachineTemplate::from_text("a = 1\nb = \"{{ nope }}\"").render_text(&values());
        assert_eq!(err.expect_err("unknown").to_string(), "line 2: unknown placeholder {{nope}}");
        let err = MachineTemplate::from_text("b = \"{{ image\"").render_text(&values());
        assert_eq!(
            err.expect_err("unclosed").to_string(),
            "line 1: a placeholder is opened with {{ and never closed"
        );
    }

    #[test]
    fn check_refuses_a_template_that_cannot_make_a_machine() {
        assert!(MachineTemplate::from_text("x = \"{{ nope }}\"").check().is_err());
        assert!(MachineTemplate::from_text("not toml [").check().is_err());
        assert!(MachineTemplate::from_text("region = \"{{region}}\"").check().is_err());
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let shipped = MachineTemplate::load(&root.join("deploy/daemon/fly.toml.tmpl"));
        shipped.expect("template").check().expect("the shipped template renders");
    }

    #[test]
    fn strings_are_escaped() {
        let text = MachineTemplate::from_text("t = \"{{daemon_token}}\"").render_text(&values());
        assert_eq!(text.expect("renders"), "t = \"tok\\\"en\"\n");
    }

    /// Snapshot of the shipped template rendered for one user, as Fly receives it.
    /// Refresh with `UPDATE_SNAPSHOTS=1`.
    #[test]
    fn shipped_template_snapshot() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let template =
            MachineTemplate::load(&root.join("deploy/daemon/fly.toml.tmpl")).expect("template");
        let request = template.render(&values()).expect("renders");
        let rendered = serde_json::to_string_pretty(&request).expect("json") + "\n";

        let snapshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/machine.json");
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::create_dir_all(snapshot.parent().expect("parent")).expect("mkdir");
            std::fs::write(&snapshot, &rendered).expect("write snapshot");
        }
        let expected = std::fs::read_to_string(&snapshot).expect("snapshot (UPDATE_SNAPSHOTS=1)");
        assert_eq!(rendered, expected);

        let service = &request.config.services[0];
        assert_eq!(service.autostop, Some(machines::types::Autostop::Suspend));
        assert_eq!(request.config.mounts[0].path, "/data");
        assert_eq!(request.config.checks["healthz"].path.as_deref(), Some("/healthz"));
    }
}

//! Chat templates: the Jinja template a model ships (GGUF `tokenizer.chat_template`, or
//! `tokenizer_config.json`'s `chat_template` / a `chat_template.jinja` beside it) rendered as
//! transformers' `apply_chat_template` and vLLM render it: minijinja with `trim_blocks` and
//! `lstrip_blocks`, Python's string methods (`.strip()`, `.startswith()`...), and the globals
//! those templates call (`raise_exception`, `strftime_now`, a `tojson` that writes JSON as
//! Python's `json.dumps` does).

use std::path::Path;

use minijinja::value::Kwargs;
use minijinja::{context, Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One message of a chat: `{"role", "content"}`, the content a string or a list of
/// `{"type": "text", "text"}` parts (joined).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    #[serde(deserialize_with = "text_or_parts")]
    pub content: String,
}

fn text_or_parts<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    #[derive(Deserialize)]
    struct Part {
        #[serde(rename = "type")]
        kind: String,
        text: Option<String>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Content {
        Text(String),
        Parts(Vec<Part>),
    }
    match Content::deserialize(d)? {
        Content::Text(t) => Ok(t),
        Content::Parts(parts) => parts
            .into_iter()
            .map(|p| match (p.kind.as_str(), p.text) {
                ("text", Some(t)) => Ok(t),
                (kind, _) => Err(serde::de::Error::custom(format!(
                    "content part of type `{kind}`: only text parts are supported"
                ))),
            })
            .collect(),
    }
}

/// A model's chat template with the special tokens it refers to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// A template and the texts of the model's BOS and EOS tokens (empty when it has none).
    /// Fails, naming `origin`, when the template does not parse.
    pub fn new(
        source: String,
        bos_token: String,
        eos_token: String,
        origin: &Path,
    ) -> Result<Self> {
        let template = Self {
            source,
            bos_token,
            eos_token,
        };
        template.environment().map_err(|e| Error::Tokenizer {
            reason: format!(
                "{}: the chat template does not parse: {e}",
                origin.display()
            ),
        })?;
        Ok(template)
    }

    /// The template of a `tokenizer_config.json` (`chat_template`: a string, or a list of
    /// `{name, template}` whose `default` is taken) or of `chat_template.jinja` beside it, with
    /// its `bos_token` and `eos_token`; `None` when the directory has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::config(&config_path, format!("not valid JSON: {e}")))?,
            Err(_) => serde_json::Value::Null,
        };
        let jinja = dir.join("chat_template.jinja");
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            _ if jinja.exists() => {
                Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
            }
            _ => None,
        };
        let Some(source) = source else {
            return Ok(None);
        };
        // a token is a string or {"content": ...}
        let token = |key: &str| -> String {
            match config.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_string(),
                None => String::new(),
            }
        };
        Self::new(source, token("bos_token"), token("eos_token"), &config_path).map(Some)
    }

    fn environment(&self) -> std::result::Result<Environment<'_>, minijinja::Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", python_tojson);
        env.add_template("chat", &self.source)?;
        Ok(env)
    }

    /// The conversation as the model reads it, with the assistant's turn opened when
    /// `add_generation_prompt`. A template's own error (`raise_exception`, a role it refuses)
    /// comes back as the reason.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let failed = |e: minijinja::Error| Error::Tokenizer {
            reason: format!("the chat template: {e}"),
        };
        let env = self.environment().map_err(failed)?;
        let template = env.get_template("chat").map_err(failed)?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(failed)
    }
}

/// `strftime_now(format)`: the local time formatted by the C library (Llama 3.1's templates
/// date their system prompt with it).
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let bad = || minijinja::Error::new(ErrorKind::InvalidOperation, "strftime_now: bad format");
    let c_format = std::ffi::CString::new(format).map_err(|_| bad())?;
    let mut out = vec![0u8; 256];
    // SAFETY: `time` and `localtime_r` fill the plain structs given; `strftime` writes at most
    // `out.len()` bytes into `out` and returns how many.
    let n = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&now, &mut tm);
        libc::strftime(out.as_mut_ptr().cast(), out.len(), c_format.as_ptr(), &tm)
    };
    out.truncate(n);
    String::from_utf8(out).map_err(|_| bad())
}

/// `tojson` as transformers defines it: Python's `json.dumps(value, ensure_ascii=False)`
/// (`", "` and `": "` between items, keys in their order, non-ASCII kept), `indent=n` for
/// indented output.
fn python_tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_python_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// Writes `v` as Python's `json.dumps` does (see [`python_tojson`]).
fn write_python_json(
    v: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    let (open, between, close) = match indent {
        Some(n) => (
            format!("\n{}", " ".repeat(n * (depth + 1))),
            format!(",\n{}", " ".repeat(n * (depth + 1))),
            format!("\n{}", " ".repeat(n * depth)),
        ),
        None => (String::new(), ", ".to_string(), String::new()),
    };
    let kind = v.kind();
    let (start, end) = match kind {
        ValueKind::Seq | ValueKind::Iterable => ('[', ']'),
        ValueKind::Map => ('{', '}'),
        _ => {
            let json = serde_json::to_string(v)
                .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
            out.push_str(&json);
            return Ok(());
        }
    };
    let items: Vec<Value> = v.try_iter()?.collect();
    out.push(start);
    if !items.is_empty() {
        out.push_str(&open);
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&between);
        }
        if kind == ValueKind::Map {
            // keys are written as JSON strings
            let key = item.to_string();
            out.push_str(&serde_json::Value::String(key).to_string());
            out.push_str(": ");
            write_python_json(&v.get_item(item)?, indent, depth + 1, out)?;
        } else {
            write_python_json(item, indent, depth + 1, out)?;
        }
    }
    if !items.is_empty() {
        out.push_str(&close);
    }
    out.push(end);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs
            .iter()
            .map(|(role, content)| ChatMessage {
                role: role.to_string(),
                content: content.to_string(),
            })
            .collect()
    }

    #[test]
    fn chatml_renders_with_the_generation_prompt() {
        let source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(
            source.into(),
            String::new(),
            "<|im_end|>".into(),
            Path::new("t"),
        )
        .unwrap();
        let m = messages(&[("system", "Be brief."), ("user", " Hi ")]);
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!t.render(&m, false).unwrap().ends_with("assistant\n"));
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let source = "{{ bos_token }}{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}{{ m.content.strip().upper() }}|{% endfor %}";
        let t =
            ChatTemplate::new(source.into(), "<s>".into(), "</s>".into(), Path::new("t")).unwrap();
        let ok = messages(&[("user", " a "), ("assistant", "b")]);
        assert_eq!(t.render(&ok, false).unwrap(), "<s>A|B|");
        let bad = messages(&[("assistant", "b")]);
        let err = t.render(&bad, false).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn tojson_writes_as_python_does() {
        let t = ChatTemplate::new(
            "{{ messages | tojson }}".into(),
            String::new(),
            String::new(),
            Path::new("t"),
        )
        .unwrap();
        let m = messages(&[("user", "é <b>")]);
        assert_eq!(
            t.render(&m, false).unwrap(),
            r#"[{"role": "user", "content": "é <b>"}]"#
        );
    }

    #[test]
    fn a_broken_template_is_named() {
        let err = ChatTemplate::new(
            "{% for %}".into(),
            String::new(),
            String::new(),
            Path::new("m/x.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("m/x.json") && err.contains("chat template"),
            "{err}"
        );
    }

    #[test]
    fn content_parts_are_joined() {
        let m: ChatMessage = serde_json::from_str(
            r#"{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}"#,
        )
        .unwrap();
        assert_eq!(m.content, "ab");
        let image = serde_json::from_str::<ChatMessage>(
            r#"{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}"#,
        );
        assert!(image.unwrap_err().to_string().contains("image_url"));
    }
}

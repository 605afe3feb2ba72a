//! Projectors by name.

use std::sync::Arc;

use super::Projector;

/// The projectors a daemon knows. The built-in ones come from
/// [`crate::projectors::builtin`]; an application adds its own with [`Registry::register`].
#[derive(Clone, Default)]
pub struct Registry {
    projectors: Vec<Arc<dyn Projector>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// [`Registry::register`] for a projector defined at run time (a SQL
    /// projection's file): a name that clashes with another, or is not lowercase
    /// letters, digits and underscores, is an error naming the problem.
    pub fn try_register(mut self, projector: impl Projector) -> Result<Registry, String> {
        if self.get(projector.name()).is_some() {
            return Err(format!(
                "the name {} is taken by another projector (built-in, or another file)",
                projector.name()
            ));
        }
        if !valid_name(projector.name()) {
            return Err(format!(
                "projector name {:?} must be lowercase letters, digits and underscores",
                projector.name()
            ));
        }
        self.projectors.push(Arc::new(projector));
        Ok(self)
    }

    /// Adds a projector compiled into the program. Names are checkpoint keys, so
    /// a duplicate (or a name other than lowercase letters, digits and
    /// underscores) is a programming error: it panics at start-up rather than
    /// being left to corrupt a checkpoint.
    pub fn register(mut self, projector: impl Projector) -> Registry {
        assert!(
            self.get(projector.name()).is_none(),
            "projector {:?} is registered twice",
            projector.name()
        );
        assert!(
            valid_name(projector.name()),
            "projector name {:?} must be lowercase letters, digits and underscores",
            projector.name()
        );
        self.projectors.push(Arc::new(projector));
        self
    }

    /// The projector named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Projector>> {
        self.projectors.iter().find(|p| p.name() == name)
    }

    /// Every projector's name, in registration order.
    pub fn names(&self) -> Vec<&str> {
        self.projectors.iter().map(|p| p.name()).collect()
    }

    /// Every projector, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Projector>> {
        self.projectors.iter()
    }

    /// Resolves names from the command line or the configuration: `all` means every
    /// projector; an unknown name is an error that lists the known ones.
    pub fn resolve(&self, names: &[String]) -> anyhow::Result<Vec<Arc<dyn Projector>>> {
        if names.iter().any(|n| n == "all") {
            return Ok(self.projectors.clone());
        }
        let mut out: Vec<Arc<dyn Projector>> = Vec::new();
        for name in names {
            let Some(p) = self.get(name) else {
                anyhow::bail!(
                    "unknown projector {:?} (known: {}, or all)",
                    name,
                    self.names().join(", ")
                );
            };
            if !out.iter().any(|q| q.name() == p.name()) {
                out.push(p.clone());
            }
        }
        Ok(out)
    }
}

/// Lowercase letters, digits and `_`, at most 63 bytes: a projector name is a
/// checkpoint key and becomes part of schema names (rebuilds).
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

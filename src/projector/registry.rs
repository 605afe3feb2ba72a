//! Projectors by name.

use std::sync::Arc;

use super::upcast::Upcast;
use super::Projector;
use crate::feed::Upcasters;

/// The projectors a daemon knows. The built-in ones come from
/// [`crate::projectors::builtin`]; an application adds its own with [`Registry::register`].
#[derive(Clone, Default)]
pub struct Registry {
    /// As handed out: read through the upcasters that concern each.
    projectors: Vec<Arc<dyn Projector>>,
    /// As registered.
    plain: Vec<Arc<dyn Projector>>,
    upcasters: Upcasters,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// [`Registry::register`] for a projector defined at run time (a SQL
    /// projection's file): a name that clashes with another, or is not lowercase
    /// letters, digits and underscores, is an error naming the problem.
    pub fn try_register(self, projector: impl Projector) -> Result<Registry, String> {
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
        Ok(self.add(Arc::new(projector)))
    }

    /// Adds a projector compiled into the program. Names are checkpoint keys, so
    /// a duplicate (or a name other than lowercase letters, digits and
    /// underscores) is a programming error: it panics at start-up rather than
    /// being left to corrupt a checkpoint.
    pub fn register(self, projector: impl Projector) -> Registry {
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
        self.add(Arc::new(projector))
    }

    fn add(mut self, projector: Arc<dyn Projector>) -> Registry {
        self.projectors
            .push(read_through(projector.clone(), &self.upcasters));
        self.plain.push(projector);
        self
    }

    /// Every projector, from now on, reads its events through the upcasters of
    /// the event types it consumes (`[[upcasters]]`, see [`Upcasters`]), which
    /// join its fingerprint; a projector that consumes none of those types is
    /// left exactly as it was. Replaces the upcasters given before, if any.
    pub fn with_upcasters(mut self, upcasters: &Upcasters) -> Registry {
        self.upcasters = upcasters.clone();
        self.projectors = self
            .plain
            .iter()
            .map(|p| read_through(p.clone(), upcasters))
            .collect();
        self
    }

    /// The upcasters no projector reads through: of event types none consumes.
    pub fn unused_upcasters(&self) -> Vec<String> {
        self.upcasters
            .iter()
            .filter(|u| {
                !self.projectors.iter().any(|p| {
                    p.filter()
                        .upcasters
                        .iter()
                        .any(|w| w.event_type == u.event_type)
                })
            })
            .map(|u| u.label())
            .collect()
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

/// `p`, read through those of `upcasters` that concern it.
fn read_through(p: Arc<dyn Projector>, upcasters: &Upcasters) -> Arc<dyn Projector> {
    let concerning = upcasters.consumed_by(&p.filter());
    if concerning.is_empty() {
        return p;
    }
    Arc::new(Upcast {
        inner: p,
        upcasters: concerning,
    })
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

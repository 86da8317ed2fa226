//! A machine list's filters and paging, as the public API takes them in a
//! query string (`metadata.{key}` parameters cannot be a fixed struct) and
//! as flaps passes them on to each host, so a host sends only one filtered
//! page, ordered by id, never its whole listing.

use crate::machine::Machine;

/// Most machines one page holds.
pub const MAX_PAGE: usize = 1000;

/// Filters and paging of a machine list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub include_deleted: bool,
    pub region: Option<String>,
    pub states: Vec<String>,
    pub metadata: Vec<(String, String)>,
    /// Without config, checks and events (the gateway's concern).
    pub summary: bool,
    pub limit: Option<usize>,
    /// The last id of the previous page.
    pub cursor: Option<String>,
}

impl ListQuery {
    /// Reads a query string's pairs; each problem names its parameter.
    pub fn parse(pairs: Vec<(String, String)>) -> Result<Self, String> {
        let flag = |name: &str, v: &str| match v {
            "" | "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            other => Err(format!("{name}: expected true or false, got {other:?}")),
        };
        let mut q = Self::default();
        for (k, v) in pairs {
            match k.as_str() {
                "include_deleted" => q.include_deleted = flag(&k, &v)?,
                "summary" => q.summary = flag(&k, &v)?,
                "region" if !v.is_empty() => q.region = Some(v),
                "state" => q
                    .states
                    .extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_string)),
                "limit" => {
                    let n: usize = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_PAGE).contains(n))
                        .ok_or_else(|| format!("limit: must be between 1 and {MAX_PAGE}"))?;
                    q.limit = Some(n);
                }
                "cursor" if !v.is_empty() => q.cursor = Some(v),
                key => {
                    if let Some(meta) = key.strip_prefix("metadata.") {
                        q.metadata.push((meta.to_string(), v));
                    }
                }
            }
        }
        if q.cursor.is_some() && q.limit.is_none() {
            return Err("cursor: requires limit".into());
        }
        Ok(q)
    }

    /// Whether the filters keep `m`.
    pub fn keeps(&self, m: &Machine) -> bool {
        self.region.as_deref().is_none_or(|r| m.region == r)
            && (self.states.is_empty() || self.states.iter().any(|s| s == m.state.as_str()))
            && self
                .metadata
                .iter()
                .all(|(k, v)| m.config.metadata.get(k) == Some(v))
    }

    /// Filters and cuts one page out of a whole listing: the page and the
    /// cursor of the next one (the last id returned), if more remain.
    pub fn page(&self, mut all: Vec<Machine>) -> (Vec<Machine>, Option<String>) {
        all.retain(|m| self.keeps(m));
        if let Some(after) = &self.cursor {
            all.retain(|m| m.id.as_str() > after.as_str());
        }
        self.cut(all, false)
    }

    /// Machines already filtered (pages merged from several hosts, say)
    /// as one page: ordered by id, cut to `limit`, with the cursor of the
    /// next page when `more` remain elsewhere or some were cut off.
    pub fn cut(&self, mut all: Vec<Machine>, more: bool) -> (Vec<Machine>, Option<String>) {
        all.sort_by(|a, b| a.id.cmp(&b.id));
        let Some(limit) = self.limit else {
            return (all, None);
        };
        let more = more || all.len() > limit;
        all.truncate(limit);
        let next = more.then(|| all.last().map(|m| m.id.clone())).flatten();
        (all, next)
    }

    /// The query string that asks a host for the page of at most `limit`
    /// machines after `cursor` that these filters keep.
    pub fn host_query(&self, cursor: Option<&str>, limit: usize) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("include_deleted", &self.include_deleted.to_string());
        if let Some(region) = &self.region {
            q.append_pair("region", region);
        }
        if !self.states.is_empty() {
            q.append_pair("state", &self.states.join(","));
        }
        for (key, value) in &self.metadata {
            q.append_pair(&format!("metadata.{key}"), value);
        }
        q.append_pair("limit", &limit.to_string());
        if let Some(cursor) = cursor {
            q.append_pair("cursor", cursor);
        }
        q.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, region: &str, state: &str, meta: &[(&str, &str)]) -> Machine {
        let config = crate::MachineConfig {
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        serde_json::from_value(serde_json::json!({
            "id": id, "name": id, "state": state, "region": region, "instance_id": "v",
            "version": "v", "private_ip": "127.10.0.2", "config": config,
            "created_at": "", "updated_at": ""
        }))
        .unwrap()
    }

    fn q(pairs: &[(&str, &str)]) -> Result<ListQuery, String> {
        ListQuery::parse(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn filters_and_pages_by_id() {
        let all = || {
            vec![
                machine("c", "dev", "started", &[("role", "web")]),
                machine("a", "dev", "stopped", &[]),
                machine("b", "ams", "started", &[("role", "web")]),
                machine("d", "dev", "started", &[("role", "db")]),
            ]
        };
        let ids = |(page, next): (Vec<Machine>, Option<String>)| {
            (page.into_iter().map(|m| m.id).collect::<Vec<_>>(), next)
        };
        assert_eq!(ids(q(&[]).unwrap().page(all())).0, ["a", "b", "c", "d"]);
        assert_eq!(
            ids(q(&[("region", "dev"), ("state", "started")])
                .unwrap()
                .page(all()))
            .0,
            ["c", "d"]
        );
        assert_eq!(
            ids(q(&[("metadata.role", "web")]).unwrap().page(all())).0,
            ["b", "c"]
        );
        assert_eq!(
            ids(q(&[("limit", "2")]).unwrap().page(all())),
            (vec!["a".into(), "b".into()], Some("b".into()))
        );
        assert_eq!(
            ids(q(&[("limit", "2"), ("cursor", "b")]).unwrap().page(all())),
            (vec!["c".into(), "d".into()], None)
        );
        assert!(q(&[("cursor", "b")]).is_err());
        assert!(q(&[("limit", "0")]).is_err());
        assert!(q(&[("summary", "maybe")]).is_err());
    }

    #[test]
    fn a_host_query_reads_back_as_the_same_filters() {
        let asked = q(&[
            ("region", "dev"),
            ("state", "started,stopped"),
            ("metadata.role", "a&b=c"),
            ("include_deleted", "true"),
        ])
        .unwrap();
        let text = asked.host_query(Some("m1"), 10);
        let pairs = form_urlencoded::parse(text.as_bytes())
            .into_owned()
            .collect();
        let read = ListQuery::parse(pairs).unwrap();
        assert_eq!(
            read,
            ListQuery {
                limit: Some(10),
                cursor: Some("m1".into()),
                ..asked
            }
        );
    }
}

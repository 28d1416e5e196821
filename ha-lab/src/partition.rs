//! Network partitions between IDC address ranges, with nftables.
//!
//! A [`Scope`] says whose traffic a partition cuts and where its rules live:
//!
//! - [`Scope::lab`]: one lab, told apart by its port offset. Its rules live in its own table
//!   `table inet halab_<offset>` and drop only packets to or from the lab's own ports (TCP and
//!   UDP), so two labs on the same IDC ranges with different offsets never cut each other, and
//!   one lab's `heal_all` never deletes another's rules. This is what `ha-lab fault partition`
//!   and `ha-lab down` use ([`Manifest::partition_scope`](crate::lab::Manifest::partition_scope)).
//! - [`Scope::every_port`]: table `table inet halab`, every packet between the ranges. The free
//!   functions [`partition`], [`heal`], [`heal_all`] and [`partitioned`] use it; meant for tests
//!   on ranges of their own (e.g. `/32`s nobody else uses).
//!
//! In its table a scope keeps one base chain per partitioned IDC (output hook, named after its
//! range, e.g. `idc4_127_0_1_0_24`) holding the drop rules of that partition. Every change is one
//! `nft -f` transaction that never depends on a listing read before it: a partition (re)creates
//! the IDC's chain with its rules, a heal deletes that chain, `heal_all` the table. The kernel
//! applies transactions one after the other, so a heal racing a partition (of the same IDC or
//! another) leaves each IDC as its last change made it. Only the scope's own table is ever
//! deleted. Needs root and the `nft` program (Debian package `nftables`).
//!
//! ```no_run
//! # fn demo() -> Result<(), ha_lab::LabError> {
//! use ha_lab::partition::Scope;
//! let lab = Scope::lab(0, [15353, 18080, 18081]);
//! let bj_a = "127.0.1.0/24".parse().unwrap();
//! lab.partition(bj_a, &["127.0.2.0/24".parse().unwrap(), "127.0.3.0/24".parse().unwrap()])?;
//! lab.heal(bj_a)?;
//! lab.heal_all()?;
//! # Ok(()) }
//! ```

use std::{
    io::Write,
    net::{IpAddr, Ipv6Addr},
    process::{Command, Stdio},
};

use ipnet::IpNet;

use crate::{LabError, cgroup::IdcCgroup, process::find_program};

/// The table of [`Scope::every_port`] (family `inet`); a lab's table is `halab_<offset>`.
pub const TABLE: &str = "halab";

/// True when the `nft` program is on `PATH`.
pub fn nft_available() -> bool {
    find_program("nft").is_some()
}

fn missing() -> LabError {
    LabError::MissingBinary {
        program: "nft".into(),
        package: "nftables".into(),
    }
}

/// The chain of `idc`'s partition: a name that encodes the range exactly (IPv6 in full).
fn chain(idc: IpNet) -> String {
    match idc {
        IpNet::V4(n) => {
            let [a, b, c, d] = n.network().octets();
            format!("idc4_{a}_{b}_{c}_{d}_{}", n.prefix_len())
        }
        IpNet::V6(n) => format!("idc6_{:032x}_{}", u128::from(n.network()), n.prefix_len()),
    }
}

/// The range encoded in a chain name made by [`chain`].
fn chain_idc(name: &str) -> Option<IpNet> {
    if let Some(rest) = name.strip_prefix("idc4_") {
        let parts: Vec<u8> = rest
            .split('_')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        let [a, b, c, d, prefix] = parts[..] else {
            return None;
        };
        return IpNet::new(IpAddr::from([a, b, c, d]), prefix).ok();
    }
    let (hex, prefix) = name.strip_prefix("idc6_")?.split_once('_')?;
    let ip = Ipv6Addr::from(u128::from_str_radix(hex, 16).ok()?);
    IpNet::new(IpAddr::V6(ip), prefix.parse().ok()?).ok()
}

fn family(net: IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "ip",
        IpNet::V6(_) => "ip6",
    }
}

/// Runs `nft` with `args`, feeding `script` on stdin when given; returns stdout.
fn nft(action: &str, args: &[&str], script: Option<&str>) -> Result<String, LabError> {
    let program = find_program("nft").ok_or_else(missing)?;
    let fail = |message: String| LabError::Nft {
        action: action.to_owned(),
        message,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if script.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let (Some(script), Some(mut stdin)) = (script, child.stdin.take()) {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whose traffic a partition cuts, and the nftables table its rules live in. See the
/// [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    table: String,
    /// `None`: every packet between the ranges; otherwise only TCP/UDP to or from these ports.
    ports: Option<Vec<u16>>,
}

impl Default for Scope {
    /// [`Scope::every_port`].
    fn default() -> Self {
        Scope::every_port()
    }
}

impl Scope {
    /// Table `halab`, every packet between the ranges (what the free functions use).
    pub fn every_port() -> Scope {
        Scope {
            table: TABLE.to_owned(),
            ports: None,
        }
    }

    /// The lab with port offset `port_offset` serving on `ports`: table `halab_<offset>`, and
    /// only TCP/UDP packets whose destination or source port is one of `ports` are dropped
    /// (the requests to the lab's servers and their answers). With no ports it cuts nothing.
    ///
    /// ```
    /// let lab = ha_lab::partition::Scope::lab(1200, [19281, 16553, 19280, 19281]);
    /// assert_eq!(lab.table(), "halab_1200");
    /// assert_eq!(lab.ports(), Some(&[16553, 19280, 19281][..]));
    /// ```
    pub fn lab(port_offset: u16, ports: impl IntoIterator<Item = u16>) -> Scope {
        let mut ports: Vec<u16> = ports.into_iter().collect();
        ports.sort_unstable();
        ports.dedup();
        Scope {
            table: format!("{TABLE}_{port_offset}"),
            ports: Some(ports),
        }
    }

    /// The nftables table (family `inet`) of this scope.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The ports whose packets are cut, `None` for every packet.
    pub fn ports(&self) -> Option<&[u16]> {
        self.ports.as_deref()
    }

    /// The lines that (re)create `idc`'s chain, empty.
    fn chain_lines(&self, idc: IpNet) -> String {
        let table = &self.table;
        let chain = chain(idc);
        format!(
            "add table inet {table}\n\
             add chain inet {table} {chain} {{ type filter hook output priority 0; policy accept; }}\n\
             flush chain inet {table} {chain}\n"
        )
    }

    /// The nft transaction of [`Scope::partition`]: `idc`'s chain emptied and filled again (so
    /// partitioning twice replaces rather than adds), with a drop rule per direction, and per
    /// destination and source port when the scope has ports.
    pub fn partition_script(&self, idc: IpNet, others: &[IpNet]) -> String {
        let fam = family(idc);
        let (table, chain) = (&self.table, chain(idc));
        let mut script = self.chain_lines(idc);
        let others: Vec<String> = others
            .iter()
            .filter(|o| family(**o) == fam)
            .map(IpNet::to_string)
            .collect();
        if others.is_empty() || self.ports.as_ref().is_some_and(Vec::is_empty) {
            return script;
        }
        let others = others.join(", ");
        let matches: Vec<String> = match &self.ports {
            None => vec![String::new()],
            Some(ports) => {
                let ports = ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                ["dport", "sport"]
                    .iter()
                    .map(|dir| format!(" meta l4proto {{ tcp, udp }} th {dir} {{ {ports} }}"))
                    .collect()
            }
        };
        for (s, d) in [
            (idc.to_string(), &others),
            (others.clone(), &idc.to_string()),
        ] {
            for m in &matches {
                script.push_str(&format!(
                    "add rule inet {table} {chain} {fam} saddr {{ {s} }} {fam} daddr {{ {d} }}{m} drop\n"
                ));
            }
        }
        script
    }

    /// The lines that (re)create `idc`'s input chain (the rules of processes placed in IDCs
    /// that match the receiving socket), empty.
    fn in_chain_lines(&self, idc: IpNet) -> String {
        let table = &self.table;
        let chain = chain(idc);
        format!(
            "add table inet {table}\n\
             add chain inet {table} {chain}_in {{ type filter hook input priority 0; policy accept; }}\n\
             flush chain inet {table} {chain}_in\n"
        )
    }

    /// The nft transaction of [`Scope::heal`]: `idc`'s chains created if missing, then deleted,
    /// so healing an IDC that is not partitioned needs no listing first and is not an error.
    pub fn heal_script(&self, idc: IpNet) -> String {
        let mut script = self.in_chain_lines(idc);
        script.push_str(&format!(
            "delete chain inet {} {}_in\n",
            self.table,
            chain(idc)
        ));
        script.push_str(&self.chain_lines(idc));
        script.push_str(&format!(
            "delete chain inet {} {}\n",
            self.table,
            chain(idc)
        ));
        script
    }

    /// [`Scope::partition_script`] plus the rules of the processes placed in IDCs: the
    /// sockets of `members` (processes of `idc`) may not reach `others`, and those of
    /// `other_members` may not reach `idc_cidr` (on the scope's ports, as destination: the
    /// connections they open to the lab's servers).
    pub fn partition_members_script(
        &self,
        idc_cidr: IpNet,
        members: &[&IdcCgroup],
        others: &[IpNet],
        other_members: &[&IdcCgroup],
    ) -> String {
        let mut script = self.partition_script(idc_cidr, others);
        if self.ports.as_ref().is_some_and(Vec::is_empty) {
            return script;
        }
        let fam = family(idc_cidr);
        let (table, chain) = (&self.table, chain(idc_cidr));
        // ` meta l4proto { tcp, udp } th <dir> { ports }`, or nothing with every port cut.
        let ports = |dir: &str| match &self.ports {
            None => String::new(),
            Some(ports) => format!(
                " meta l4proto {{ tcp, udp }} th {dir} {{ {} }}",
                ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let others: Vec<String> = others
            .iter()
            .filter(|o| family(**o) == fam)
            .map(IpNet::to_string)
            .collect();
        // Each placed process's group and the ranges on the other side of the cut from it.
        let mut pairs: Vec<(&IdcCgroup, String)> = Vec::new();
        if !others.is_empty() {
            let joined = others.join(", ");
            pairs.extend(members.iter().map(|g| (*g, joined.clone())));
        }
        pairs.extend(other_members.iter().map(|g| (*g, idc_cidr.to_string())));
        // Output: what their own sockets send to the other side (a connect, a request).
        let dports = ports("dport");
        for (g, peers) in &pairs {
            script.push_str(&format!(
                "add rule inet {table} {chain} {} {fam} daddr {{ {peers} }}{dports} drop\n",
                g.nft_match()
            ));
        }
        // Input: what the other side's servers send to their sockets (the data of a connection
        // they opened, e.g. a primary's binlog to a replica), matched on the receiving socket.
        script.push_str(&self.in_chain_lines(idc_cidr));
        let sports = ports("sport");
        for (g, peers) in &pairs {
            script.push_str(&format!(
                "add rule inet {table} {chain}_in {fam} saddr {{ {peers} }} {}{sports} drop\n",
                g.nft_match()
            ));
        }
        script
    }

    /// [`Scope::partition`] with processes placed in IDCs (see [`crate::cgroup`]): the
    /// processes of `members` are cut off with `idc_cidr`, those of `other_members` with
    /// `others` (one nft transaction; a second call replaces the first).
    pub fn partition_members(
        &self,
        idc_cidr: IpNet,
        members: &[&IdcCgroup],
        others: &[IpNet],
        other_members: &[&IdcCgroup],
    ) -> Result<(), LabError> {
        let script = self.partition_members_script(idc_cidr, members, others, other_members);
        nft(
            &format!("partition {idc_cidr} in table {}", self.table),
            &["-f", "-"],
            Some(&script),
        )?;
        tracing::info!(idc = %idc_cidr, ?others, members = members.len(), other_members = other_members.len(), table = %self.table, "partitioned");
        Ok(())
    }

    /// Drops the scope's traffic in both directions between `idc_cidr` and each of `others`
    /// (one nft transaction; a second call replaces the first). Ranges of a different address
    /// family than `idc_cidr` are skipped.
    pub fn partition(&self, idc_cidr: IpNet, others: &[IpNet]) -> Result<(), LabError> {
        let script = self.partition_script(idc_cidr, others);
        nft(
            &format!("partition {idc_cidr} in table {}", self.table),
            &["-f", "-"],
            Some(&script),
        )?;
        tracing::info!(idc = %idc_cidr, ?others, table = %self.table, "partitioned");
        Ok(())
    }

    /// Removes the partition of `idc_cidr` (one nft transaction). Healing an IDC that is not
    /// partitioned is not an error. The table stays, empty, until [`Scope::heal_all`].
    pub fn heal(&self, idc_cidr: IpNet) -> Result<(), LabError> {
        nft(
            &format!("heal {idc_cidr} in table {}", self.table),
            &["-f", "-"],
            Some(&self.heal_script(idc_cidr)),
        )?;
        tracing::info!(idc = %idc_cidr, table = %self.table, "healed");
        Ok(())
    }

    /// The IDC ranges partitioned now in this scope (one chain each), sorted.
    pub fn partitioned(&self) -> Result<Vec<IpNet>, LabError> {
        let exists = nft("list tables", &["list", "tables"], None)?
            .lines()
            .any(|l| l.trim() == format!("table inet {}", self.table));
        if !exists {
            return Ok(Vec::new());
        }
        // The table can go between the two commands (a concurrent heal_all).
        let Ok(listing) = nft("list table", &["list", "table", "inet", &self.table], None) else {
            return Ok(Vec::new());
        };
        let mut idcs: Vec<IpNet> = listing
            .lines()
            .filter_map(|l| l.trim().strip_prefix("chain ")?.strip_suffix(" {"))
            .filter_map(chain_idc)
            .collect();
        idcs.sort();
        Ok(idcs)
    }

    /// Deletes the scope's table (every partition of the scope; one nft transaction that
    /// creates the table first, so it is not an error when there is none). No other table is
    /// touched.
    pub fn heal_all(&self) -> Result<(), LabError> {
        let table = &self.table;
        let script = format!("add table inet {table}\ndelete table inet {table}\n");
        nft(
            &format!("delete table {table}"),
            &["-f", "-"],
            Some(&script),
        )?;
        Ok(())
    }
}

/// [`Scope::partition`] of [`Scope::every_port`]: drops every packet in both directions between
/// `idc_cidr` and each of `others`, in table `halab`.
pub fn partition(idc_cidr: IpNet, others: &[IpNet]) -> Result<(), LabError> {
    Scope::every_port().partition(idc_cidr, others)
}

/// [`Scope::heal`] of [`Scope::every_port`]. Healing an IDC that is not partitioned is not an
/// error.
pub fn heal(idc_cidr: IpNet) -> Result<(), LabError> {
    Scope::every_port().heal(idc_cidr)
}

/// [`Scope::partitioned`] of [`Scope::every_port`].
pub fn partitioned() -> Result<Vec<IpNet>, LabError> {
    Scope::every_port().partitioned()
}

/// [`Scope::heal_all`] of [`Scope::every_port`]: deletes table `halab`, and no other.
pub fn heal_all() -> Result<(), LabError> {
    Scope::every_port().heal_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn chain_names_encode_the_range_exactly() {
        for idc in [
            "127.0.1.0/24",
            "127.0.1.221/32",
            "fd00:1::/64",
            "::ffff:1.2.3.4/128",
        ] {
            let name = chain(net(idc));
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{name}"
            );
            assert_eq!(chain_idc(&name), Some(net(idc)), "{name}");
        }
        assert_eq!(chain(net("127.0.1.0/24")), "idc4_127_0_1_0_24");
        assert_ne!(
            chain(net("::ffff:1.2.3.4/128")),
            chain(net("::ffff:1:2:3:4/128"))
        );
        assert_eq!(chain_idc("out"), None);
    }

    #[test]
    fn a_partition_is_one_transaction_that_replaces_and_a_heal_needs_no_listing() {
        let p = Scope::every_port().partition_script(
            net("127.0.1.0/24"),
            &[net("127.0.2.0/24"), net("127.0.3.0/24"), net("fd00::/8")],
        );
        let lines: Vec<&str> = p.lines().collect();
        assert_eq!(lines[0], "add table inet halab");
        assert!(
            lines[1]
                .starts_with("add chain inet halab idc4_127_0_1_0_24 { type filter hook output")
        );
        assert_eq!(lines[2], "flush chain inet halab idc4_127_0_1_0_24");
        assert_eq!(
            lines[3],
            "add rule inet halab idc4_127_0_1_0_24 ip saddr { 127.0.1.0/24 } ip daddr { 127.0.2.0/24, 127.0.3.0/24 } drop"
        );
        assert_eq!(
            lines[4],
            "add rule inet halab idc4_127_0_1_0_24 ip saddr { 127.0.2.0/24, 127.0.3.0/24 } ip daddr { 127.0.1.0/24 } drop"
        );
        assert_eq!(lines.len(), 5, "the IPv6 range is skipped: {p}");
        let h = Scope::every_port().heal_script(net("127.0.1.0/24"));
        assert!(
            h.ends_with("delete chain inet halab idc4_127_0_1_0_24\n"),
            "{h}"
        );
        assert!(!h.contains("handle"), "{h}");
    }

    #[test]
    fn a_labs_rules_match_its_own_ports_in_its_own_table() {
        let lab = Scope::lab(1200, [19281, 16553, 19280]);
        let p = lab.partition_script(
            net("127.0.1.0/24"),
            &[net("127.0.2.0/24"), net("127.0.3.0/24")],
        );
        let lines: Vec<&str> = p.lines().collect();
        assert_eq!(lines[0], "add table inet halab_1200");
        let rules: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("add rule"))
            .collect();
        assert_eq!(rules.len(), 4, "{p}");
        for r in &rules {
            assert!(
                r.starts_with("add rule inet halab_1200 idc4_127_0_1_0_24 ip saddr"),
                "{r}"
            );
            assert!(r.contains(" meta l4proto { tcp, udp } th "), "{r}");
            assert!(r.ends_with(" { 16553, 19280, 19281 } drop"), "{r}");
        }
        assert!(
            rules[0].contains("ip saddr { 127.0.1.0/24 } ip daddr { 127.0.2.0/24, 127.0.3.0/24 }")
        );
        assert!(rules[0].contains("th dport"));
        assert!(rules[1].contains("th sport"));
        assert!(
            rules[2].contains("ip saddr { 127.0.2.0/24, 127.0.3.0/24 } ip daddr { 127.0.1.0/24 }")
        );
        // Another offset: another table, so neither heals the other's rules.
        let other = Scope::lab(0, [15353, 18080, 18081]);
        assert_eq!(other.table(), "halab_0");
        assert!(
            other
                .heal_script(net("127.0.1.0/24"))
                .lines()
                .all(|l| l.contains("halab_0 ") || l.ends_with("halab_0"))
        );
        // No ports: nothing to cut.
        let none = Scope::lab(7, []);
        assert!(
            !none
                .partition_script(net("127.0.1.0/24"), &[net("127.0.2.0/24")])
                .contains("add rule")
        );
    }
}

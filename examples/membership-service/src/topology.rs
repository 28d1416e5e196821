//! `GET /topology`: every dependency's endpoints with region, IDC, locality, role, health,
//! generation and whether it is in use, the drained IDCs, and who holds the job's lease.

use std::net::SocketAddr;

use ha_core::{Locality, Topology};
use serde_json::{Value, json};

use crate::http::AppState;

/// Where `idc` (in `region`) is relative to the local IDC.
fn locality(topo: &Topology, idc: Option<&str>, region: Option<&str>) -> Locality {
    if idc == Some(&*topo.local_idc().name) {
        Locality::SameIdc
    } else if region == Some(&*topo.local_region().name) {
        Locality::SameRegion
    } else {
        Locality::Remote
    }
}

fn endpoint(st: &AppState, addr: SocketAddr, idc_hint: Option<&str>, extra: Value) -> Value {
    let topo = st.ctx.topology();
    let placement = topo.classifier().classify(addr.ip());
    let idc = idc_hint
        .map(str::to_string)
        .or_else(|| placement.idc.as_deref().map(str::to_string));
    let region = idc
        .as_deref()
        .and_then(|i| topo.idc(i))
        .map(|i| i.region.to_string())
        .or_else(|| placement.region.as_deref().map(str::to_string));
    let locality = locality(topo, idc.as_deref(), region.as_deref()).as_str();
    let drained = idc
        .as_deref()
        .is_some_and(|i| st.ctx.control().is_drained(i));
    let mut v = json!({
        "addr": addr.to_string(),
        "region": region,
        "idc": idc,
        "locality": locality,
        "drained": drained,
    });
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    v
}

fn published(st: &AppState, name: &str) -> Vec<ha_core::Endpoint> {
    st.ctx.publisher(name).watch().borrow().endpoints.to_vec()
}

fn configured_replicas(st: &AppState, dependency: &str) -> Vec<SocketAddr> {
    let Some(dep) = st.ctx.topology().dependency(dependency) else {
        return Vec::new();
    };
    let Ok(settings) = dep.settings::<Value>() else {
        return Vec::new();
    };
    settings["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// The snapshot.
pub async fn snapshot(st: &AppState) -> Value {
    let topo = st.ctx.topology();
    let drained: Vec<String> = st
        .ctx
        .control()
        .drained()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut redis = Vec::new();
    if let Some(m) = st.store.cache().current_master() {
        redis.push(endpoint(
            st,
            m.addr,
            m.idc.as_deref(),
            json!({
                "role": "master",
                "health": "up",
                "generation": m.generation,
                "in_use": true,
                // Moving a master is Sentinel's job: a drain leaves it where it is.
                "movable": false,
            }),
        ));
    }
    let deps = &st.deps;
    let redis_master = redis
        .first()
        .and_then(|m| m["addr"].as_str().map(str::to_string));
    for e in published(st, &format!("{}-replicas", deps.cache)) {
        if Some(e.addr.to_string()) == redis_master {
            continue;
        }
        redis.push(endpoint(
            st,
            e.addr,
            e.idc.as_deref(),
            json!({
                "role": "replica",
                "health": "up",
                "generation": null,
                // ha-redis reads from the master (reads of the example need its writes).
                "in_use": false,
                "movable": true,
            }),
        ));
    }
    let mut mysql = Vec::new();
    if let Some(m) = st.store.db().master().current() {
        mysql.push(endpoint(
            st,
            m.addr,
            m.idc.as_deref(),
            json!({
                "role": "primary",
                "health": "up",
                "generation": m.generation,
                "in_use": true,
                // Moving the primary is the HA system's job: a drain leaves it where it is.
                "movable": false,
            }),
        ));
    }
    // Every configured replica: "up" while ha-mysql publishes it (SQL thread running, within
    // the lag bound), else "lagging_or_down".
    let healthy: Vec<SocketAddr> = published(st, &format!("{}.replicas", deps.db))
        .iter()
        .map(|e| e.addr)
        .collect();
    for addr in configured_replicas(st, &deps.db) {
        let up = healthy.contains(&addr);
        mysql.push(endpoint(
            st,
            addr,
            None,
            json!({
                "role": "replica",
                "health": if up { "up" } else { "lagging_or_down" },
                "generation": null,
                "in_use": up,
                "movable": true,
            }),
        ));
    }
    let events = st.store.events();
    let idcs = events.idcs();
    let in_use = idcs
        .iter()
        .find(|i| !events.is_avoided(i) && !st.ctx.control().is_drained(i))
        .map(|s| s.to_string());
    let mq: Vec<Value> = idcs
        .iter()
        .map(|idc| {
            let region = topo.idc(idc).map(|i| i.region.to_string());
            json!({
                "idc": idc,
                "region": region,
                "locality": locality(topo, Some(idc), region.as_deref()).as_str(),
                "role": "cluster",
                "health": if events.is_avoided(idc) { "avoided" } else { "up" },
                "generation": null,
                "in_use": in_use.as_deref() == Some(*idc),
                "drained": st.ctx.control().is_drained(idc),
                "movable": true,
            })
        })
        .collect();
    let job = st.job.as_ref().map(|j| j.snapshot());
    json!({
        "instance": &*st.instance,
        "local_idc": &*topo.local_idc().name,
        "drained": drained,
        "dependencies": {
            "cache": {"kind": "redis", "endpoints": redis},
            "db": {"kind": "mysql", "endpoints": mysql},
            "events": {"kind": "rocketmq", "endpoints": mq},
        },
        "job": job,
    })
}

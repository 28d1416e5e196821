use tower_layer::Layer;

use super::service::{Builder, LocalityBalance, MakeEndpoint};

/// A [`Layer`] that turns a [`MakeEndpoint`] (a function from an [`Endpoint`](crate::Endpoint) to
/// its service) into a [`LocalityBalance`], so it composes with `tower::ServiceBuilder`.
///
/// ```no_run
/// # fn f(topo: &ha_core::Topology, watch: ha_core::EndpointWatch) {
/// use ha_core::balance::LocalityBalanceLayer;
/// use ha_core::failover::FailoverLayer;
/// use tower::ServiceBuilder;
///
/// let svc = ServiceBuilder::new()
///     .layer(FailoverLayer::default())
///     .layer(LocalityBalanceLayer::new(ha_core::balance::LocalityBalance::builder(topo, watch)))
///     .service(|ep: &ha_core::Endpoint| {
///         let addr = ep.addr;
///         tower::service_fn(move |_req: ()| async move { Ok::<_, std::io::Error>(addr) })
///     });
/// # let _ = svc; }
/// ```
#[derive(Clone)]
pub struct LocalityBalanceLayer {
    builder: Builder,
}

impl LocalityBalanceLayer {
    /// A layer building balancers from `builder`.
    pub fn new(builder: Builder) -> Self {
        LocalityBalanceLayer { builder }
    }
}

impl std::fmt::Debug for LocalityBalanceLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalityBalanceLayer")
            .finish_non_exhaustive()
    }
}

impl<M> Layer<M> for LocalityBalanceLayer
where
    M: MakeEndpoint + Send + Sync + 'static,
    M::Service: Clone + Send + Sync + 'static,
{
    type Service = LocalityBalance<M::Service>;

    fn layer(&self, make: M) -> Self::Service {
        self.builder
            .clone()
            .build(move |ep: &crate::Endpoint| make.make(ep))
    }
}

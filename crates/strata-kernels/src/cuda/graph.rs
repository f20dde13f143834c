//! Recorded launches replayed as a CUDA graph: a decode step's ~200 kernels launched by one call.
//!
//! [`Recorder::start`] turns on recording for the calling thread: from then on [`Cuda::launch`]
//! on that device keeps each launch (function, grid, parameter struct, pointers) instead of
//! queuing it, until [`Recorder::finish`] hands the list back. [`LaunchGraph::run`] then makes
//! the list one graph launch. The graph is kept between calls: when the next list has the same
//! kernels in the same order (a decode step's do, token after token), only the nodes whose
//! grid, parameters or pointers changed are updated (`cuGraphExecKernelNodeSetParams`: the
//! attention's key count and splits, the KV append's position, a buffer that grew); a list of
//! other kernels builds a new graph. Nodes form one chain, so the graph runs the kernels in the
//! order and on the stream they would have run in.
//!
//! Only kernel launches are recorded. Other stream work of a recorded pass (an upload of a KV
//! block table, zeroing a fresh buffer) is queued at once, so it runs before the pass's kernels:
//! fine for writes into memory those kernels do not read before they would have, which is what
//! the decoder's passes do. cuBLAS and [`Cuda::memset_zero`] refuse to run while recording, and
//! a buffer a recorded launch uses must outlive the graph's run ([`Recorder::retire`]).

use std::any::Any;
use std::cell::RefCell;
use std::ffi::c_void;

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig};

use crate::cuda::{Cuda, driver};
use crate::{Error, Result};

/// A launch parameter struct as a recorded launch keeps it: compared with the next step's, and
/// passed to the driver by address.
trait Params: Send {
    fn same(&self, other: &dyn Params) -> bool;
    fn as_any(&self) -> &dyn Any;
    fn address(&self) -> *mut c_void;
}

impl<P: DeviceRepr + Clone + PartialEq + Send + 'static> Params for P {
    fn same(&self, other: &dyn Params) -> bool {
        other.as_any().downcast_ref::<P>() == Some(self)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn address(&self) -> *mut c_void {
        self as *const P as *mut c_void
    }
}

/// One recorded kernel launch.
pub struct Launch {
    kernel: &'static str,
    function: CudaFunction,
    cfg: LaunchConfig,
    params: Box<dyn Params>,
    ptrs: Vec<u64>,
}

/// What [`plan`] asks of a launch.
pub(crate) trait Step {
    /// Whether `other` launches the same function (a node of the same graph can take its grid
    /// and arguments).
    fn same_function(&self, other: &Self) -> bool;
    /// Whether `other` is this launch exactly: function, grid, parameters and pointers.
    fn same(&self, other: &Self) -> bool;
}

impl Step for Launch {
    fn same_function(&self, other: &Launch) -> bool {
        self.function.cu_function() == other.function.cu_function()
    }

    fn same(&self, other: &Launch) -> bool {
        self.same_function(other)
            && self.cfg.grid_dim == other.cfg.grid_dim
            && self.cfg.block_dim == other.cfg.block_dim
            && self.cfg.shared_mem_bytes == other.cfg.shared_mem_bytes
            && self.params.same(&*other.params)
            && self.ptrs == other.ptrs
    }
}

/// What a thread is recording.
struct Recording {
    ordinal: usize,
    launches: Vec<Launch>,
    retired: Vec<Box<dyn Any>>,
}

thread_local! {
    static RECORDING: RefCell<Option<Recording>> = const { RefCell::new(None) };
}

/// Whether the calling thread records the launches of device `ordinal`.
pub(crate) fn recording(ordinal: usize) -> bool {
    RECORDING.with_borrow(|r| r.as_ref().is_some_and(|r| r.ordinal == ordinal))
}

/// Keeps the launch if the calling thread records `ordinal`'s launches: true if it did.
pub(crate) fn record<P: DeviceRepr + Clone + PartialEq + Send + 'static>(
    ordinal: usize,
    kernel: &'static str,
    function: &CudaFunction,
    cfg: LaunchConfig,
    params: &P,
    ptrs: &[u64],
) -> bool {
    RECORDING.with_borrow_mut(|r| match r {
        Some(r) if r.ordinal == ordinal => {
            let params = Box::new(params.clone());
            r.launches.push(Launch { kernel, function: function.clone(), cfg, params, ptrs: ptrs.to_vec() });
            true
        }
        _ => false,
    })
}

/// Recording of the calling thread's launches on one device.
pub struct Recorder {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Recorder {
    /// Starts recording the calling thread's launches on `cuda` (an error if it already records).
    pub fn start(cuda: &Cuda) -> Result<Recorder> {
        RECORDING.with_borrow_mut(|r| {
            if r.is_some() {
                return Err(Error::invalid("Recorder::start", "this thread is already recording launches"));
            }
            *r = Some(Recording { ordinal: cuda.ordinal(), launches: Vec::new(), retired: Vec::new() });
            Ok(Recorder { _not_send: std::marker::PhantomData })
        })
    }

    /// Keeps `value` (a buffer a recorded launch may use) alive until the recording is finished
    /// and its launches queued; without recording, drops it at once.
    pub fn retire<T: 'static>(value: T) {
        RECORDING.with_borrow_mut(|r| match r {
            Some(r) => r.retired.push(Box::new(value)),
            None => drop(value),
        });
    }

    /// Stops recording: the launches, in order, and what was retired meanwhile (to be dropped
    /// after the launches are queued).
    pub fn finish(self) -> (Vec<Launch>, Retired) {
        let r = RECORDING.with_borrow_mut(Option::take).expect("a Recorder records");
        std::mem::forget(self);
        (r.launches, Retired(r.retired))
    }
}

impl Drop for Recorder {
    /// A recorder dropped unfinished (an error in the pass) discards what it recorded.
    fn drop(&mut self) {
        RECORDING.with_borrow_mut(Option::take);
    }
}

/// Buffers retired during a recording ([`Recorder::retire`]): drop them after the recorded
/// launches are queued (their frees are ordered on the stream after them).
pub struct Retired(#[allow(dead_code)] Vec<Box<dyn Any>>);

/// The kernel node parameters of `l`; `args` receives the argument addresses they point to and
/// must live until the driver call that takes them returns.
fn node_params(l: &Launch, args: &mut Vec<*mut c_void>) -> sys::CUDA_KERNEL_NODE_PARAMS {
    args.clear();
    args.push(l.params.address());
    args.extend(l.ptrs.iter().map(|p| p as *const u64 as *mut c_void));
    sys::CUDA_KERNEL_NODE_PARAMS {
        func: l.function.cu_function(),
        gridDimX: l.cfg.grid_dim.0,
        gridDimY: l.cfg.grid_dim.1,
        gridDimZ: l.cfg.grid_dim.2,
        blockDimX: l.cfg.block_dim.0,
        blockDimY: l.cfg.block_dim.1,
        blockDimZ: l.cfg.block_dim.2,
        sharedMemBytes: l.cfg.shared_mem_bytes,
        kernelParams: args.as_mut_ptr(),
        extra: std::ptr::null_mut(),
        kern: std::ptr::null_mut(),
        ctx: std::ptr::null_mut(),
    }
}

fn check(what: &str, r: CUresult) -> Result<()> {
    r.result().map_err(driver(what))
}

/// How a kept graph takes the next list of launches ([`plan`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Another list of kernels: a new graph.
    Rebuild,
    /// The same kernels: these nodes take new grids, parameters or pointers.
    Update(Vec<usize>),
}

/// Whether `next` can update a graph made from `kept`, and which nodes change.
pub(crate) fn plan<S: Step>(kept: &[S], next: &[S]) -> Plan {
    if kept.len() != next.len() || kept.iter().zip(next).any(|(a, b)| !a.same_function(b)) {
        return Plan::Rebuild;
    }
    Plan::Update((0..next.len()).filter(|&i| !kept[i].same(&next[i])).collect())
}

/// A graph of recorded launches, instantiated, with the launches it holds now.
pub struct LaunchGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    nodes: Vec<sys::CUgraphNode>,
    launches: Vec<Launch>,
    /// Graphs built and nodes updated so far (for benchmarks and tests).
    stats: GraphStats,
}

// SAFETY: the graph handles are used only through `&mut LaunchGraph` (the driver requires calls
// on one graph to be serialized, which exclusive access does).
unsafe impl Send for LaunchGraph {}

/// What a [`LaunchGraph`] has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs built (the first list, and each list of other kernels).
    pub builds: usize,
    /// Runs that updated the kept graph.
    pub updates: usize,
    /// Nodes those updates changed, in all.
    pub nodes_updated: usize,
}

/// How [`LaunchGraph::run`] queued a pass.
#[derive(Debug)]
pub enum GraphRun {
    /// As one graph launch.
    Graph,
    /// Kernel by kernel ([`replay`]), because the graph could not be made or launched: why.
    Replayed(Error),
}

impl LaunchGraph {
    /// Queues `launches` on `cuda`'s compute stream as one graph launch, updating the graph in
    /// `slot` when it holds the same kernels, else building one there. Should the driver refuse
    /// the graph, `slot` is emptied and the launches are queued one by one instead.
    pub fn run(slot: &mut Option<LaunchGraph>, cuda: &Cuda, launches: Vec<Launch>) -> Result<GraphRun> {
        if launches.is_empty() {
            return Ok(GraphRun::Graph);
        }
        cuda.context().bind_to_thread().map_err(driver("bind_to_thread"))?;
        let stats = slot.as_ref().map(|g| g.stats).unwrap_or_default();
        let plan = slot.as_ref().map_or(Plan::Rebuild, |g| plan(&g.launches, &launches));
        let queued = match (plan, slot.as_mut()) {
            (Plan::Update(changed), Some(g)) => g.update(&launches, &changed).map(|()| {
                g.stats.updates += 1;
                g.stats.nodes_updated += changed.len();
            }),
            _ => {
                *slot = None;
                LaunchGraph::build(&launches).map(|g| {
                    let g = slot.insert(g);
                    g.stats = GraphStats { builds: stats.builds + 1, ..stats };
                })
            }
        };
        let launched = queued.and_then(|()| {
            let g = slot.as_mut().expect("built or updated above");
            // SAFETY: the exec is instantiated; the stream is the device's compute stream.
            check("cuGraphLaunch", unsafe { sys::cuGraphLaunch(g.exec, cuda.stream().cu_stream()) })
        });
        match launched {
            Ok(()) => {
                slot.as_mut().expect("launched above").launches = launches;
                Ok(GraphRun::Graph)
            }
            Err(e) => {
                *slot = None;
                replay(cuda, &launches)?;
                Ok(GraphRun::Replayed(e))
            }
        }
    }

    /// Gives nodes `changed` the grids and arguments of `launches` (the same kernels as the
    /// graph's).
    fn update(&mut self, launches: &[Launch], changed: &[usize]) -> Result<()> {
        let mut args = Vec::new();
        for &i in changed {
            let p = node_params(&launches[i], &mut args);
            // SAFETY: exec and the node are this graph's; p and the arguments it points to are
            // alive for the call, which copies them.
            check(launches[i].kernel, unsafe { sys::cuGraphExecKernelNodeSetParams_v2(self.exec, self.nodes[i], &p) })?;
        }
        Ok(())
    }

    /// A chain of kernel nodes, one per launch, instantiated (its `launches` left empty: the
    /// caller keeps them once the graph has run).
    fn build(launches: &[Launch]) -> Result<LaunchGraph> {
        let mut g = LaunchGraph {
            graph: std::ptr::null_mut(),
            exec: std::ptr::null_mut(),
            nodes: Vec::with_capacity(launches.len()),
            launches: Vec::new(),
            stats: GraphStats::default(),
        };
        // SAFETY: creates an empty graph owned by g (destroyed by its Drop).
        check("cuGraphCreate", unsafe { sys::cuGraphCreate(&mut g.graph, 0) })?;
        let mut args = Vec::new();
        for l in launches {
            let p = node_params(l, &mut args);
            let mut node = std::ptr::null_mut();
            let (deps, n) = match g.nodes.last() {
                Some(prev) => (prev as *const sys::CUgraphNode, 1),
                None => (std::ptr::null(), 0),
            };
            // SAFETY: the graph is g's; deps points to the previous node (or none); p and its
            // arguments are alive for the call, which copies them.
            check(l.kernel, unsafe { sys::cuGraphAddKernelNode_v2(&mut node, g.graph, deps, n, &p) })?;
            g.nodes.push(node);
        }
        // SAFETY: the graph is complete; the exec is owned by g.
        check("cuGraphInstantiate", unsafe { sys::cuGraphInstantiateWithFlags(&mut g.exec, g.graph, 0) })?;
        Ok(g)
    }

    /// What this graph has done.
    pub fn stats(&self) -> GraphStats {
        self.stats
    }
}

impl Drop for LaunchGraph {
    fn drop(&mut self) {
        // SAFETY: the handles are this graph's own; errors at teardown have nowhere to go.
        unsafe {
            if !self.exec.is_null() {
                let _ = sys::cuGraphExecDestroy(self.exec);
            }
            if !self.graph.is_null() {
                let _ = sys::cuGraphDestroy(self.graph);
            }
        }
    }
}

/// Queues `launches` one by one, as [`Cuda::launch`] would have: the way back when a graph
/// cannot be made or run.
pub fn replay(cuda: &Cuda, launches: &[Launch]) -> Result<()> {
    cuda.context().bind_to_thread().map_err(driver("bind_to_thread"))?;
    let mut raw = Vec::new();
    for l in launches {
        let p = node_params(l, &mut raw);
        // SAFETY: the recorded launch was checked by its launcher when recorded, and its buffers
        // are alive (the caller's contract); p's arguments live for the call.
        let r = unsafe {
            sys::cuLaunchKernel(
                p.func,
                p.gridDimX,
                p.gridDimY,
                p.gridDimZ,
                p.blockDimX,
                p.blockDimY,
                p.blockDimZ,
                p.sharedMemBytes,
                cuda.stream().cu_stream(),
                p.kernelParams,
                std::ptr::null_mut(),
            )
        };
        check(l.kernel, r)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A launch as (function, arguments).
    #[derive(Clone)]
    struct Fake(u32, u32);

    impl Step for Fake {
        fn same_function(&self, other: &Fake) -> bool {
            self.0 == other.0
        }
        fn same(&self, other: &Fake) -> bool {
            self.0 == other.0 && self.1 == other.1
        }
    }

    #[test]
    fn a_graph_updates_only_the_nodes_that_changed_and_rebuilds_for_other_kernels() {
        let step = |args: [u32; 3]| vec![Fake(1, args[0]), Fake(2, args[1]), Fake(1, args[2])];
        assert_eq!(plan(&step([5, 6, 7]), &step([5, 6, 7])), Plan::Update(vec![]));
        assert_eq!(plan(&step([5, 6, 7]), &step([5, 9, 8])), Plan::Update(vec![1, 2]));
        // Another kernel in a place, or one more (the attention's combine step appearing).
        let other = vec![Fake(1, 5), Fake(3, 6), Fake(1, 7)];
        assert_eq!(plan(&step([5, 6, 7]), &other), Plan::Rebuild);
        let longer = [step([5, 6, 7]), vec![Fake(4, 0)]].concat();
        assert_eq!(plan(&step([5, 6, 7]), &longer), Plan::Rebuild);
        assert_eq!(plan::<Fake>(&[], &[]), Plan::Update(vec![]));
    }
}
